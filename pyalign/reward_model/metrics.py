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
