"""``task: dpa``: Directional Preference Alignment by rejection sampling against a multi-objective
reward model, fine-tuning on the best sample per preference direction (docs/dpa.md).

- :mod:`pyalign.tasks.dpa.config`: the config;
- :mod:`pyalign.tasks.dpa.data`: prompt files, halves, directions per prompt, selection, replay;
- :mod:`pyalign.tasks.dpa.loop`: the iterations (sample, score, select, fine-tune; resumable);
- :mod:`pyalign.tasks.dpa.evaluate`: the empirical front and the arithmetic-control check.
"""

from pyalign.tasks.dpa.config import DPAConfig, check_dpa
from pyalign.tasks.dpa.loop import DPAResult, DPARun, run_dpa, summary
from pyalign.train import Task, register_task

__all__ = ["DPAConfig", "DPAResult", "DPARun", "run_dpa"]

register_task(Task("dpa", DPAConfig, run_dpa, check=check_dpa, summary=summary,
                   doc="Directional Preference Alignment: rejection sampling against a multi-objective "
                       "reward model, fine-tuning on the best sample per direction"))
