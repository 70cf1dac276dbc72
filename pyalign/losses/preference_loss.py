"""``PreferenceLoss``: from logits (or hidden states + lm_head weight) to a preference loss.

Rows are laid out chosen first, then rejected: logits ``[2B, T, V]``, labels ``[2B, T]`` aligned
with the logits (``labels[:, t]`` is the token ``logits[:, t]`` predicts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyalign.losses import pairwise as losses
from pyalign.losses.pairwise import LossOutput
from pyalign.ops.token_logprobs import sequence_logprobs
from pyalign.reference import IGNORE_INDEX


def split_pairs(values: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """[..., 2B] -> ([..., B] chosen, [..., B] rejected)."""
    if values.shape[-1] % 2:
        raise ValueError(
            f"{name}: expected an even number of rows (chosen rows first, then rejected), "
            f"got {values.shape[-1]}"
        )
    half = values.shape[-1] // 2
    return values[..., :half], values[..., half:]


class PreferenceLoss(torch.nn.Module):
    """One call from logits to a preference loss.

    ``loss``: one of ``pyalign.losses.LOSSES``; ``beta`` and the loss's own keyword arguments
    (``label_smoothing``, ``alphas`` for spo, ``kl`` for kto_pair); ``nll_weight`` adds the SFT
    term on the chosen responses; ``average`` length-averages the sequence log-probs (default:
    only for ipo, as its formula expects).
    """

    def __init__(
        self,
        loss: str = "dpo",
        beta: float = 0.1,
        *,
        nll_weight: float = 0.0,
        average: bool | None = None,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        inplace_backward: bool = False,
        **loss_kwargs,
    ):
        super().__init__()
        self.loss_fn = losses.get_loss(loss)
        self.loss_name = loss
        if loss == "spo" and "alphas" not in loss_kwargs:
            raise ValueError("alphas: the spo loss needs alphas (one per earlier round)")
        losses.check_nll_weight(nll_weight)
        if average is not None and not isinstance(average, bool):
            raise ValueError(f"average: expected True, False or None (ipo only), got {average!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
        self.beta = beta
        self.loss_kwargs = loss_kwargs
        self.nll_weight = nll_weight
        self.average = (loss == "ipo") if average is None else average
        self.ignore_index = ignore_index
        self.backend = backend
        self.inplace_backward = inplace_backward
        # Fail at construction, not at the first batch, on a bad keyword or value.
        self._check_kwargs()
        losses.check_loss_options(loss, beta=beta, **loss_kwargs)

    def _check_kwargs(self) -> None:
        import inspect  # noqa: PLC0415

        params = inspect.signature(self.loss_fn).parameters
        for key in self.loss_kwargs:
            if key not in params or params[key].kind != inspect.Parameter.KEYWORD_ONLY:
                allowed = [k for k, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
                raise ValueError(f"{key}: not an option of the {self.loss_name} loss (options: {allowed})")

    def loss_from_sequence_logprobs(
        self,
        policy_logps: Tensor,
        ref_logps: Tensor | None = None,
        chain_logps: Tensor | None = None,
        num_tokens: Tensor | None = None,
    ) -> LossOutput:
        """The loss from ``[2B]`` policy sequence log-probs (the part after the fused op)."""
        policy_chosen, policy_rejected = split_pairs(policy_logps, "logits")
        if self.loss_name == "spo":
            if chain_logps is None:
                raise ValueError("chain_logps: the spo loss needs the frozen models' log-probs [n, 2B]")
            if chain_logps.dim() != 2 or chain_logps.shape[1] != policy_logps.shape[0]:
                raise ValueError(
                    f"chain_logps: expected shape [n, {policy_logps.shape[0]}], got {tuple(chain_logps.shape)}"
                )
            chain_chosen, chain_rejected = split_pairs(chain_logps, "chain_logps")
            out = self.loss_fn(policy_chosen, policy_rejected, chain_chosen, chain_rejected,
                               beta=self.beta, **self.loss_kwargs)
        else:
            if ref_logps is None:
                raise ValueError(f"ref_logps: the {self.loss_name} loss needs reference log-probs [2B]")
            if tuple(ref_logps.shape) != tuple(policy_logps.shape):
                raise ValueError(
                    f"ref_logps: expected shape {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}"
                )
            ref_chosen, ref_rejected = split_pairs(ref_logps, "ref_logps")
            out = self.loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               beta=self.beta, **self.loss_kwargs)
        if self.nll_weight:
            chosen_tokens = None
            if num_tokens is not None and not self.average:
                chosen_tokens, _ = split_pairs(num_tokens, "labels")
            nll = losses.nll(policy_chosen, num_tokens=chosen_tokens)
            out.extra["nll"] = nll.detach()
            out.loss = out.loss + self.nll_weight * nll
        return out

    def forward(
        self,
        logits: Tensor | None = None,
        labels: Tensor | None = None,
        ref_logps: Tensor | None = None,
        chain_logps: Tensor | None = None,
        *,
        hidden: Tensor | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        **fused_kwargs,
    ) -> LossOutput:
        if labels is None:
            raise ValueError("labels: required ([2B, T], aligned with the logits)")
        if hidden is not None or weight is not None:
            if logits is not None:
                raise ValueError("logits: pass either logits or hidden=/weight=, not both")
            if hidden is None or weight is None:
                raise ValueError("hidden, weight: the fused-linear path needs both")
            from pyalign.losses.linear_preference_loss import linear_preference_loss  # noqa: PLC0415

            return linear_preference_loss(
                self, hidden, weight, labels, bias=bias, ref_logps=ref_logps,
                chain_logps=chain_logps, **fused_kwargs,
            )
        if logits is None:
            raise ValueError("logits: required (or hidden= and weight= for the fused-linear path)")
        if fused_kwargs:
            raise ValueError(f"{next(iter(fused_kwargs))}: only valid with hidden=/weight=")
        if logits.dim() < 2:
            raise ValueError(f"logits: expected [2B, T, V], got shape {tuple(logits.shape)}")
        policy_logps = sequence_logprobs(
            logits, labels, ignore_index=self.ignore_index, average=self.average,
            backend=self.backend, inplace_backward=self.inplace_backward,
        )
        num_tokens = (labels != self.ignore_index).sum(-1)
        return self.loss_from_sequence_logprobs(policy_logps, ref_logps, chain_logps, num_tokens)

