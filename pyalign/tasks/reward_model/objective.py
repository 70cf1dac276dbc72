"""The reward model's training objective: MSE between predicted and true ratings on the 0-100 scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyalign.reward_model.metrics import flatten, objective_metrics
from pyalign.train import Objective, ObjectiveOutput


class RewardRegressionObjective(Objective):
    """MSE between the reward model's ratings and the true ratings, both on the 0-100 scale,
    averaged over the batch's examples and the k objectives (the DPA paper's eq. 1 divided by k).
    Batches come from :class:`pyalign.reward_model.data.RatingsDataset`; validation reports,
    per objective, MSE, Pearson r and pairwise ranking accuracy
    (:mod:`pyalign.reward_model.metrics`)."""

    name = "reward_model"
    unit = "examples"
    progress_metrics = ()

    def __init__(self, objectives):
        self.objectives = list(objectives)

    def check_data(self, dataset, split: str) -> None:
        names = [s.name for s in getattr(dataset, "scales", [])]
        if names != self.objectives:
            raise ValueError(f"data.{split}: expected ratings of the objectives {self.objectives}, "
                             f"the data set has {names}")

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["targets"].shape[0])

    def loss(self, model, batch: dict[str, Tensor]) -> ObjectiveOutput:
        # batch -> backbone -> final hidden state at the last non-padding token -> head -> [B, k]
        predictions = model(batch["input_ids"], batch["attention_mask"])
        # -> squared error on the 0-100 scale, mean over examples and objectives
        errors = (predictions - batch["targets"].to(predictions)) ** 2
        loss = errors.mean()
        metrics = {"loss": loss.item()}
        metrics.update({f"mse/{name}": errors[:, k].mean().item() for k, name in enumerate(self.objectives)})
        return ObjectiveOutput(loss, metrics)

    @torch.no_grad()
    def eval_rows(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"predictions": model(batch["input_ids"], batch["attention_mask"]).float(),
                "targets": batch["targets"].float(), "group": batch["group"]}

    def eval_metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        return flatten(objective_metrics(rows["predictions"], rows["targets"], rows["group"], self.objectives))
