"""``task: preference``: one round of DPO/IPO/hinge/robust/APO/KTO-pair per preference dimension,
SPO across them (docs/training.md).

- :mod:`pyalign.tasks.preference.config`: the config (rounds, method, adaptive alpha) and where
  each round's outputs go;
- :mod:`pyalign.tasks.preference.rounds`: the round loop (frozen log-probs cached once per model,
  one LoRA stage per round, resume);
- :mod:`pyalign.tasks.preference.adaptive_alpha`: SPO's alphas adapted by dual ascent;
- :mod:`pyalign.tasks.preference.evaluate`: ``pyalign eval``: models against pi_0 on every dimension.
"""

from pyalign.tasks.preference.config import (
    AdaptiveAlphaConfig, MethodConfig, RoundConfig, SequentialConfig, check_sequential, round_dir,
)
from pyalign.tasks.preference.evaluate import evaluate_model, evaluate_run, format_run_table, preference_metrics
from pyalign.tasks.preference.rounds import SequentialResult, SequentialRun, run_sequential, summary
from pyalign.train import Task, register_task

__all__ = [
    "AdaptiveAlphaConfig", "MethodConfig", "RoundConfig", "SequentialConfig", "SequentialResult", "SequentialRun",
    "evaluate_model", "evaluate_run", "format_run_table", "preference_metrics", "round_dir", "run_sequential",
]

register_task(Task(
    "preference", SequentialConfig, run_sequential, check=check_sequential, summary=summary,
    doc="preference pairs: one round of dpo/ipo/hinge/robust/apo/kto_pair per dimension, spo across them",
))
