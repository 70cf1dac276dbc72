"""Preference training on transformers + peft: single-round DPO/APO/... and sequential SPO.

    from pyalign.train import load_config, run_sequential
    result = run_sequential(load_config("configs/dpo_example.yaml"))

See docs/training.md for the config, the frozen log-prob cache and resuming.
"""

from pyalign.train.config import ConfigError, SequentialConfig, load_config
from pyalign.train.logprob_cache import StaleLogprobCacheError
from pyalign.train.sequential import SequentialResult, run_sequential

__all__ = [
    "ConfigError", "SequentialConfig", "SequentialResult", "StaleLogprobCacheError", "load_config",
    "run_sequential",
]
