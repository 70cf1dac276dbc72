"""Validation metrics of a multi-objective reward model, per objective, on the 0-100 scale.

For objective i, with predictions ``p`` and true ratings ``y`` (both rescaled to 0-100) over the
N held-out examples:

- ``mse`` = mean over examples of ``(p - y)^2``;
- ``pearson`` = Pearson correlation of ``p`` and ``y`` (NaN when either is constant);
- ``pairwise_accuracy``: over every *pair* of examples that share a prompt (same prompt and
  same system prompt) and whose true ratings differ on objective i, the fraction where the
  prediction orders them the same way (a predicted tie counts one half). This is what rejection
  sampling needs from the reward model: among responses to one prompt, pick the better one.
  NaN when there is no such pair; ``pairs`` says how many there were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

METRICS = ("mse", "pearson", "pairwise_accuracy", "pairs")


def pearson(predictions: Tensor, targets: Tensor) -> float:
    p, y = predictions.double(), targets.double()
    p, y = p - p.mean(), y - y.mean()
    denominator = math.sqrt(float((p * p).sum()) * float((y * y).sum()))
    return float((p * y).sum()) / denominator if denominator > 0 else float("nan")


def pairwise_accuracy(predictions: Tensor, targets: Tensor, groups: Tensor) -> tuple[float, int]:
    """``(accuracy, number of pairs)`` over same-group pairs with different targets."""
    correct, pairs = 0.0, 0
    for group in torch.unique(groups):
        members = (groups == group).nonzero().flatten()
        if len(members) < 2:
            continue
        p = predictions[members].double()
        y = targets[members].double()
        i, j = torch.triu_indices(len(members), len(members), offset=1)
        true_sign = torch.sign(y[i] - y[j])
        predicted_sign = torch.sign(p[i] - p[j])
        differ = true_sign != 0
        pairs += int(differ.sum())
        agree = (predicted_sign == true_sign) & differ
        tie = (predicted_sign == 0) & differ
        correct += float(agree.sum()) + 0.5 * float(tie.sum())
    return (correct / pairs if pairs else float("nan")), pairs


def objective_metrics(predictions: Tensor, targets: Tensor, groups: Tensor, names: Sequence[str]) -> dict[str, dict]:
    """``{objective: {"mse", "pearson", "pairwise_accuracy", "pairs"}}`` for ``[N, k]``
    predictions and targets (0-100) and ``[N]`` prompt groups."""
    if predictions.shape != targets.shape or predictions.shape[-1] != len(names):
        raise ValueError(f"predictions: expected the shape of targets [N, {len(names)}], "
                         f"got {tuple(predictions.shape)} and {tuple(targets.shape)}")
    result = {}
    for k, name in enumerate(names):
        p, y = predictions[:, k], targets[:, k]
        accuracy, pairs = pairwise_accuracy(p, y, groups)
        result[name] = {
            "mse": float(((p.double() - y.double()) ** 2).mean()) if len(p) else float("nan"),
            "pearson": pearson(p, y) if len(p) > 1 else float("nan"),
            "pairwise_accuracy": accuracy,
            "pairs": pairs,
        }
    return result


def flatten(metrics: dict[str, dict]) -> dict[str, float]:
    """``{"mse/helpfulness": ..., ...}`` plus ``loss`` (the mean MSE over objectives, what the
    training loss estimates): flat floats for the trainer's logs and tensorboard."""
    flat = {f"{metric}/{name}": float(values[metric]) for name, values in metrics.items() for metric in METRICS}
    flat["loss"] = sum(values["mse"] for values in metrics.values()) / max(len(metrics), 1)
    return flat


def unflatten(flat: dict[str, float]) -> dict[str, dict]:
    """The inverse of :func:`flatten` (``loss`` dropped)."""
    nested: dict[str, dict] = {}
    for key, value in flat.items():
        metric, _, name = key.partition("/")
        if name and metric in METRICS:
            nested.setdefault(name, {})[metric] = int(value) if metric == "pairs" else value
    return nested


def evaluate_reward_model(model, examples, *, batch_size: int = 16, progress: str | None = None) -> dict[str, dict]:
    """The metrics of the module docstring for ``model`` (a :class:`~pyalign.reward_model.RewardModel`)
    on rated examples: a JSONL path (read with the model's objectives) or a list of
    :class:`~pyalign.reward_model.data.RatedExample`. True ratings are rescaled with the model's
    own scales, so they are compared on its 0-100 scale."""
    from pyalign.reward_model.data import load_rated_examples, prompt_groups  # noqa: PLC0415

    if not isinstance(examples, (list, tuple)):
        examples = load_rated_examples(examples, model.objectives)
    if not examples:
        raise ValueError("examples: expected at least one rated example")
    for number, example in enumerate(examples, start=1):
        missing = [name for name in model.objectives if name not in example.ratings]
        if missing:
            raise ValueError(f"examples[{number - 1}]: ratings is missing objective {missing[0]!r}")
    predictions = model.score([e.prompt for e in examples], [e.response for e in examples],
                              system=[e.system for e in examples], batch_size=batch_size, progress=progress)
    targets = torch.tensor([[float(s.to_100(e.ratings[s.name])) for s in model.scales] for e in examples])
    groups = torch.tensor(prompt_groups([(e.system, e.prompt) for e in examples]))
    return objective_metrics(predictions, targets, groups, model.objectives)
