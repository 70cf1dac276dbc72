"""Multi-objective reward model (DPA paper, section 2.1; docs/reward_model.md).

A transformers backbone with a LoRA and a k-output linear regression head on the final hidden
state of the last non-padding token, trained with MSE on ratings rescaled to 0-100:

    from pyalign.reward_model import load_reward_model
    rm = load_reward_model("outputs/reward_model_example/reward_model")
    rm.objectives                     # ["helpfulness", "verbosity"]
    rm.score(prompts, responses)      # [n, k] float32 tensor, 0-100 scale

- :mod:`pyalign.reward_model.data`: ratings JSONL, the 0-100 rescaling, batches;
- :mod:`pyalign.reward_model.model`: :class:`RewardModel` (forward, score, save/load);
- :mod:`pyalign.reward_model.metrics`: per-objective MSE, Pearson r, pairwise ranking accuracy;
- :mod:`pyalign.tasks.reward_model.run`: the regression objective and ``task: reward_model`` of
  ``pyalign train``.
"""

from pyalign.reward_model.data import (
    ObjectiveScale, RatedExample, RatingsDataset, load_rated_examples, resolve_scales,
)
from pyalign.reward_model.metrics import evaluate_reward_model, objective_metrics, pairwise_accuracy, pearson
from pyalign.reward_model.model import RewardModel, load_reward_model

__all__ = [
    "ObjectiveScale", "RatedExample", "RatingsDataset", "load_rated_examples", "resolve_scales",
    "evaluate_reward_model", "objective_metrics", "pairwise_accuracy", "pearson", "RewardModel", "load_reward_model",
]


def __getattr__(name: str):
    # The training side (objective, config, run) moved to pyalign.tasks.reward_model.
    from pyalign._deprecated import moved_attribute  # noqa: PLC0415

    return moved_attribute(__name__, name)
