"""``task: reward_model``: a k-objective reward model (LoRA backbone + linear head) trained with
MSE on ratings rescaled to 0-100 (docs/reward_model.md). The model, its scoring and its metrics
are the library :mod:`pyalign.reward_model`; this task trains one.

- :mod:`pyalign.tasks.reward_model.config`: the config;
- :mod:`pyalign.tasks.reward_model.objective`: the regression objective the trainer runs;
- :mod:`pyalign.tasks.reward_model.run`: the run (resume, finished-run check, the saved folder).
"""

from pyalign.tasks.reward_model.config import RewardDataConfig, RewardModelConfig, check_reward_model
from pyalign.tasks.reward_model.objective import RewardRegressionObjective
from pyalign.tasks.reward_model.run import RewardModelResult, run_reward_model, summary
from pyalign.train import Task, register_task

__all__ = ["RewardDataConfig", "RewardModelConfig", "RewardModelResult", "RewardRegressionObjective",
           "run_reward_model"]

register_task(Task("reward_model", RewardModelConfig, run_reward_model, check=check_reward_model, summary=summary,
                   doc="multi-objective reward model: LoRA backbone + k-output head, MSE on ratings rescaled to 0-100"))
