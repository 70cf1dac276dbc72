"""The training engine every task runs on: one trainer for every objective, checkpoints, the
frozen log-prob cache, the shared config sections and the task registry.

    from pyalign.train import Trainer, PreferenceObjective, load_config

- :mod:`pyalign.train.trainer`: the loop (data order, micro-batches, processes, optimizer,
  checkpoints, logging), the same for every objective;
- :mod:`pyalign.train.objectives`: what one batch costs (:class:`Objective`; the preference and
  SFT objectives several tasks use);
- :mod:`pyalign.train.stage`: one LoRA fine-tuning stage, base folder in, merged folder out;
- :mod:`pyalign.train.checkpoint`, :mod:`pyalign.train.logprob_cache`: atomic checkpoints and
  the cache of frozen models' log-probs;
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
    TRAINING_FIELDS_NOT_IN_FINGERPRINT,
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    check_file,
    check_lengths,
    check_model_folder,
    read_config_source,
    training_fingerprint,
)
from pyalign.train.config_fields import (
    ConfigError,
    _build,
    _fail,
    _field,
    _number,
    boolean,
    choice,
    device_name,
    fraction,
    fused_choice,
    integer,
    list_of,
    non_negative_float,
    non_negative_int,
    optional,
    path_value,
    positive_float,
    positive_int,
    section,
    section_list,
    target_modules,
    text,
    unit_interval,
)
from pyalign.train.logprob_cache import (
    CacheKey,
    FrozenLogprobs,
    LogprobCache,
    PairsWithFrozenLogprobs,
    StaleLogprobCacheError,
    dataset_logprobs,
)
from pyalign.train.objectives import Objective, ObjectiveOutput, PreferenceObjective, SFTObjective
from pyalign.train.registry import (
    DEFAULT_TASK,
    Task,
    config_to_dict,
    describe_fields,
    get_task,
    load_config,
    register_task,
    task_names,
    task_of,
)
from pyalign.train.stage import STATE_FILE, stage_finished, train_lora_stage
from pyalign.train.trainer import Trainer

__all__ = [
    "DEFAULT_TASK", "STATE_FILE", "TRAINING_FIELDS_NOT_IN_FINGERPRINT", "CacheKey", "ConfigError", "FrozenLogprobs",
    "LogprobCache", "LoraConfig", "ModelConfig", "Objective", "ObjectiveOutput", "PairsWithFrozenLogprobs",
    "PreferenceObjective", "SFTObjective", "StaleLogprobCacheError", "Task", "Trainer", "TrainingConfig",
    "_build", "_fail", "_field", "_number", "boolean", "check_file", "check_lengths", "check_model_folder",
    "choice", "config_to_dict", "dataset_logprobs", "describe_fields", "device_name", "fraction", "fused_choice",
    "get_task", "integer", "latest_step", "list_of", "load_config", "load_latest_checkpoint", "non_negative_float",
    "non_negative_int", "optional", "path_value", "positive_float", "positive_int", "read_config_source",
    "register_task", "save_checkpoint", "section", "section_list", "stage_finished", "target_modules",
    "task_names", "task_of", "text", "train_lora_stage", "training_fingerprint", "unit_interval",
]


def __getattr__(name: str):
    # run_sequential, SFTConfig, ... moved to pyalign.tasks: found there, with a DeprecationWarning.
    return moved_attribute(__name__, name)
