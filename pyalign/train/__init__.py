"""The training engine every task runs on: one trainer for every objective, checkpoints, the
frozen log-prob cache, the shared config sections and the task registry.

    from pyalign.train import Trainer, PreferenceObjective, load_config

- :mod:`pyalign.train.trainer`: the loop (data order, micro-batches, processes, optimizer,
  checkpoints, logging), the same for every objective;
- :mod:`pyalign.train.objectives`: what one batch costs (:class:`Objective`; the preference and
  SFT objectives several tasks use);
- :mod:`pyalign.train.stage`: one LoRA fine-tuning stage, base folder in, merged folder out;
- :mod:`pyalign.train.checkpoint`, :mod:`pyalign.train.logprob_cache`: atomic, checked
  checkpoints and the cache of frozen models' log-probs;
- :mod:`pyalign.train.startup`, :mod:`pyalign.train.preemption`: a run's start (output folder
  lock, config.json) and its clean stop on a signal;
- :mod:`pyalign.train.config`, :mod:`pyalign.train.config_fields`: the sections every task's
  config shares (model, lora, training) and the pieces a config is built from;
- :mod:`pyalign.train.registry`: what a config's ``task:`` runs; loading and describing configs.

The tasks themselves (``task: preference | sft | reward_model | dpa``) live in
:mod:`pyalign.tasks` and use the engine only through the names exported here (``__all__``).
See docs/training.md.
"""

from pyalign._deprecated import moved_attribute
from pyalign.train.checkpoint import latest_step, load_latest_checkpoint, save_checkpoint
from pyalign.train.config import (
    TRAINING_FIELDS_NOT_IN_FINGERPRINT, LoraConfig, ModelConfig, TrainingConfig, check_file, check_lengths,
    check_model_folder, lora_fingerprint, read_config_source, training_fingerprint,
)
from pyalign.train.config_fields import (
    Boolean, ConfigError, DeviceName, Fraction, FusedChoice, Integer, NonNegativeFloat, NonNegativeInt, PathValue,
    PositiveFloat, PositiveInt, Section, Seed, String, TargetModules, Text, UnitInterval, check_value, checked,
    config_error, device_name, expect, expected_error, field, float_type, int_type, non_empty_list, one_of,
    one_or_list, path_value, positive_int, section, validate,
)
from pyalign.train.logprob_cache import (
    CacheKey, FrozenLogprobs, LogprobCache, PairsWithFrozenLogprobs, StaleLogprobCacheError, dataset_logprobs,
)
from pyalign.train.objectives import Objective, ObjectiveOutput, PreferenceObjective, SFTObjective
from pyalign.train.preemption import Preempted, stop_if_requested
from pyalign.train.registry import (
    DEFAULT_TASK, Task, config_schema, config_to_dict, describe_fields, get_task, load_config, register_task,
    task_names, task_of,
)
from pyalign.train.sharding import SHARDINGS, check_sharding, full_state_dict, is_sharded, shard_model, sharding_active
from pyalign.train.stage import STATE_FILE, save_trained_model, stage_finished, train_lora_stage, train_stage
from pyalign.train.startup import start_run
from pyalign.train.trainer import Trainer

__all__ = [
    "DEFAULT_TASK", "SHARDINGS", "STATE_FILE", "TRAINING_FIELDS_NOT_IN_FINGERPRINT", "Boolean", "CacheKey", "ConfigError",
    "DeviceName", "Fraction", "FrozenLogprobs", "FusedChoice", "Integer", "LogprobCache", "LoraConfig",
    "ModelConfig", "NonNegativeFloat", "NonNegativeInt", "Objective", "ObjectiveOutput", "PairsWithFrozenLogprobs",
    "PathValue", "PositiveFloat", "PositiveInt", "Preempted", "PreferenceObjective", "Section", "Seed", "SFTObjective",
    "StaleLogprobCacheError", "String", "TargetModules", "Task", "Text", "Trainer", "TrainingConfig",
    "UnitInterval", "check_file", "check_sharding", "check_lengths", "check_model_folder", "check_value", "checked", "config_error",
    "config_schema", "config_to_dict", "dataset_logprobs", "describe_fields", "device_name", "expect",
    "expected_error", "field", "float_type", "full_state_dict", "get_task", "int_type", "is_sharded", "latest_step", "load_config", "lora_fingerprint",
    "load_latest_checkpoint", "non_empty_list", "one_of", "one_or_list", "path_value", "positive_int",
    "read_config_source", "register_task", "save_checkpoint", "save_trained_model", "section", "shard_model", "sharding_active", "start_run", "stage_finished", "stop_if_requested", "task_names", "task_of",
    "train_lora_stage", "train_stage", "training_fingerprint", "validate",
]


def __getattr__(name: str):
    # run_sequential, SFTConfig, ... moved to pyalign.tasks: found there, with a DeprecationWarning.
    return moved_attribute(__name__, name)
