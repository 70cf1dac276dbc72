"""Training on transformers + peft: one trainer for every objective, tasks run by ``pyalign train``.

    from pyalign.train import load_config, run_sequential, run_sft
    result = run_sequential(load_config("configs/dpo_example.yaml"))   # task: preference
    result = run_sft("configs/sft_example.yaml")                        # task: sft

The pieces: :mod:`pyalign.train.trainer` (the loop), :mod:`pyalign.train.objectives` (what a batch
costs), :mod:`pyalign.train.tasks` (what a config's ``task:`` runs). See docs/training.md.
"""

from pyalign.train.config import ConfigError, SequentialConfig, load_config
from pyalign.train.logprob_cache import StaleLogprobCacheError
from pyalign.train.objectives import Objective, ObjectiveOutput, PreferenceObjective, SFTObjective
from pyalign.train.sequential import SequentialResult, run_sequential
from pyalign.train.sft import SFTConfig, SFTResult, run_sft
from pyalign.train.tasks import Task, get_task, register_task
from pyalign.train.trainer import Trainer

__all__ = [
    "ConfigError", "Objective", "ObjectiveOutput", "PreferenceObjective", "SFTConfig", "SFTObjective",
    "SFTResult", "SequentialConfig", "SequentialResult", "StaleLogprobCacheError", "Task", "Trainer",
    "get_task", "load_config", "register_task", "run_sequential", "run_sft",
]
