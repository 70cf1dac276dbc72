"""Training objectives: what one batch costs. The trainer (:mod:`pyalign.train.trainer`) owns
everything else (data order, micro-batches, gradient accumulation, processes, optimizer,
checkpoints, logging) and is the same for every objective.

An objective answers four questions about a collated batch (a dict of tensors made by its
dataset's ``batch(indices)``):

- ``units(batch)``: how many things the batch's loss is a mean over (pairs, response tokens,
  examples). The trainer weights each micro-batch by ``units / units of the whole step, over
  every process`` (all-reduced before the first backward), so a step equals one step on the union
  of its micro-batches whatever the split: across micro-batches, across processes, and when a
  micro-batch has no units at all (its loss must then be a finite 0 and it contributes nothing);
- ``loss(model, batch)``: the differentiable mean loss over the batch's units and float metrics
  (means over the same units), read top to bottom: batch -> model -> fused op -> sequence
  log-probs -> loss;
- ``eval_rows(model, batch)`` / ``eval_metrics(rows)``: evaluation in two halves, so that it can
  be split over processes: per-example detached tensors (leading dimension = the batch's
  examples) which the trainer gathers in data order and concatenates, then metrics over all of
  them (some, like kto_pair's batch KL or a Pearson r, are not means of per-batch values).

Here: :class:`PreferenceObjective` (any pyalign pairwise loss against frozen log-probs, or spo
against the frozen chain) and :class:`SFTObjective` (token-level NLL of responses). The reward
model's regression objective lives with the reward model (``pyalign.reward_model``) and
implements the same :class:`Objective`.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyalign.data import IGNORE_INDEX
from pyalign.losses import LossOutput
from pyalign.losses.preference_loss import PreferenceLoss, split_pairs
from pyalign.models import policy_sequence_logprobs, response_token_counts


@dataclass
class ObjectiveOutput:
    """``loss``: scalar, differentiable, the mean over the batch's units (a finite 0 when it has
    none); ``metrics``: floats, means over the same units (the trainer averages them over a step
    weighted by units)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(abc.ABC):
    """The protocol the trainer trains. Subclasses set ``name`` and ``unit`` (for logs) and may
    list ``progress_metrics`` (shown on the progress bar next to the loss)."""

    name: str = "objective"
    unit: str = "examples"
    progress_metrics: tuple[str, ...] = ()

    @abc.abstractmethod
    def units(self, batch: dict[str, Tensor]) -> int:
        """How many units the batch's mean loss is over (known before the forward pass)."""

    @abc.abstractmethod
    def loss(self, model, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Forward ``model`` on the batch (already on the model's device, inside autocast when
        the run uses it) and return the mean loss over the batch's units."""

    @abc.abstractmethod
    def eval_rows(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-example results of a batch under ``torch.no_grad`` (CPU or device tensors whose
        first dimension is the batch's number of examples)."""

    @abc.abstractmethod
    def eval_metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """Metrics over the whole eval set from the concatenated rows (in data order)."""

    def check_data(self, dataset, split: str) -> None:
        """Raise ValueError, naming ``split``, when ``dataset`` cannot feed this objective."""

    def state_dict(self) -> dict:
        """Whatever a callback may change during training (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (on resume)."""


# ----------------------------------------------------------------------------- preference pairs

class PreferenceObjective(Objective):
    """A pyalign preference loss on pairs against frozen log-probs.

    Batches come from a :class:`pyalign.train.logprob_cache.PairsWithFrozenLogprobs`: rows are
    ``[2B, T]`` (chosen rows, then rejected) and ``chain_logps`` ``[n, 2B]`` holds the frozen
    models' sequence log-probs. For spo the chain is pi_0..pi_{n-1} and ``alphas`` are the round's
    (n - 1 of them); any other loss uses the last model of the chain as its reference. With
    ``alphas`` all zero, spo's reward involves pi_{n-1} alone (S-DPO): pass ``alphas=[]`` and a
    chain of one model, and the loss is DPO from it.

    ``alphas`` may change between steps (:meth:`set_alphas`, e.g. from the trainer's step
    callback for adaptive alpha); the chain length may not.
    """

    name = "preference"
    unit = "pairs"
    progress_metrics = ("reward_accuracy",)

    def __init__(self, loss: str = "dpo", *, beta: float = 0.1, alphas=(), nll_weight: float = 0.0,
                 label_smoothing: float = 0.0, fused: bool | str = "auto"):
        self.loss_name = loss
        self.beta = beta
        self.nll_weight = nll_weight
        self.label_smoothing = label_smoothing
        self.fused = fused
        self.alphas = [float(a) for a in alphas]
        self.chain_length = len(self.alphas) + 1 if loss == "spo" else 1
        self.preference_loss = self._build_loss()
        self.average = self.preference_loss.average  # length-averaged log-probs (ipo)

    @classmethod
    def from_method(cls, method, alphas, *, fused: bool | str = "auto") -> "PreferenceObjective":
        """From a config's ``method`` section and the round's alphas."""
        return cls(method.loss, beta=method.beta, alphas=alphas, nll_weight=method.nll_weight,
                   label_smoothing=method.label_smoothing, fused=fused)

    def _build_loss(self) -> PreferenceLoss:
        kwargs = {}
        if self.loss_name == "spo":
            kwargs["alphas"] = list(self.alphas)
        elif self.loss_name in ("dpo", "robust"):
            kwargs["label_smoothing"] = self.label_smoothing
        elif self.label_smoothing:
            raise ValueError(f"label_smoothing: the {self.loss_name} loss does not use it, "
                             f"got {self.label_smoothing}")
        return PreferenceLoss(self.loss_name, beta=self.beta, nll_weight=self.nll_weight, **kwargs)

    def set_alphas(self, alphas) -> None:
        """New alpha_1..alpha_{n-1} for the next steps (kappas are recomputed from them)."""
        alphas = [float(a) for a in alphas]
        if self.loss_name != "spo":
            raise ValueError(f"alphas: only the spo loss has alphas, this objective trains {self.loss_name}")
        if len(alphas) != len(self.alphas):
            raise ValueError(f"alphas: this round's chain of {self.chain_length} frozen models needs "
                             f"{len(self.alphas)} alphas, got {len(alphas)}")
        previous = self.alphas
        self.alphas = alphas
        try:
            self.preference_loss = self._build_loss()  # validates each alpha in [0, 1]
        except ValueError:
            self.alphas = previous
            raise

    def state_dict(self) -> dict:
        return {"alphas": list(self.alphas)}

    def load_state_dict(self, state: dict) -> None:
        if self.loss_name == "spo" and "alphas" in state:
            self.set_alphas(state["alphas"])

    def check_data(self, dataset, split: str) -> None:
        chain = getattr(dataset, "chain", None)
        expected = (self.chain_length, len(dataset))
        if chain is None or tuple(chain.chosen.shape) != expected or tuple(chain.rejected.shape) != expected:
            got = None if chain is None else tuple(chain.chosen.shape)
            raise ValueError(f"data.{split}_chain: expected frozen log-probs of shape {expected} "
                             f"(models x pairs), got {got}")

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0] // 2)

    def from_sequence_logprobs(self, policy_logps: Tensor, chain_logps: Tensor, num_tokens: Tensor) -> LossOutput:
        """The loss on ``[2B]`` policy log-probs and ``[n, 2B]`` frozen ones."""
        if self.loss_name == "spo":
            return self.preference_loss.loss_from_sequence_logprobs(
                policy_logps, chain_logps=chain_logps, num_tokens=num_tokens)
        return self.preference_loss.loss_from_sequence_logprobs(
            policy_logps, ref_logps=chain_logps[-1], num_tokens=num_tokens)

    def loss(self, model, batch: dict[str, Tensor]) -> ObjectiveOutput:
        # model -> fused lm_head + fused log-prob op -> sequence log-probs [2B]
        policy = policy_sequence_logprobs(model, batch, average=self.average, fused=self.fused).float()
        # -> the preference loss against the frozen models' log-probs [n, 2B]
        out = self.from_sequence_logprobs(policy, batch["chain_logps"].to(policy), response_token_counts(batch))
        return ObjectiveOutput(out.loss, {"loss": out.loss.item(), **out.metrics})

    @torch.no_grad()
    def eval_rows(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        policy = policy_sequence_logprobs(model, batch, average=self.average, fused=self.fused).float()
        chosen, rejected = split_pairs(policy, "policy")
        chain_chosen, chain_rejected = split_pairs(batch["chain_logps"].float(), "chain_logps")
        tokens_chosen, tokens_rejected = split_pairs(response_token_counts(batch), "labels")
        return {"chosen": chosen, "rejected": rejected, "chain_chosen": chain_chosen.T,
                "chain_rejected": chain_rejected.T, "tokens_chosen": tokens_chosen,
                "tokens_rejected": tokens_rejected}

    def eval_metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """Loss, reward accuracy, margin, chosen/rejected rewards over every eval pair at once."""
        policy = torch.cat([rows["chosen"], rows["rejected"]])
        chain = torch.cat([rows["chain_chosen"], rows["chain_rejected"]]).T
        tokens = torch.cat([rows["tokens_chosen"], rows["tokens_rejected"]])
        out = self.from_sequence_logprobs(policy, chain, tokens)
        return {"loss": out.loss.item(), **out.metrics}


# ----------------------------------------------------------------------------- supervised fine-tuning

class SFTObjective(Objective):
    """Negative log-likelihood of the response tokens (prompt tokens carry ``IGNORE_INDEX``),
    normalised by response tokens: a step's loss is ``-sum log p(response tokens) / number of
    response tokens`` over the whole step, on every process together, so long and short
    responses weigh by their length and the split into micro-batches or processes changes
    nothing. The log-probs come through the fused lm_head (hidden states x lm_head weight, no
    ``[B, T, V]`` logits) when the model allows it, else the fused op on the logits."""

    name = "sft"
    unit = "tokens"

    def __init__(self, *, fused: bool | str = "auto"):
        self.fused = fused

    def units(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict[str, Tensor]) -> ObjectiveOutput:
        # model -> fused lm_head + fused log-prob op -> sequence log-probs [B] (response tokens only)
        logps = policy_sequence_logprobs(model, batch, fused=self.fused).float()
        # -> token-normalised NLL; a batch without response tokens gives a finite 0
        tokens = response_token_counts(batch).sum()
        loss = -logps.sum() / tokens.clamp(min=1)
        return ObjectiveOutput(loss, {"loss": loss.item()})

    @torch.no_grad()
    def eval_rows(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logps = policy_sequence_logprobs(model, batch, fused=self.fused).float()
        return {"logp": logps, "tokens": response_token_counts(batch)}

    def eval_metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        tokens = int(rows["tokens"].sum())
        nll = -rows["logp"].double().sum().item() / max(tokens, 1)
        return {"loss": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": float(tokens)}
