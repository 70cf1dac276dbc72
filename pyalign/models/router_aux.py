"""A mixture-of-experts model's router load-balancing loss, next to the fused lm_head.

Asked for its router logits (``output_router_logits=True``), a transformers MoE ``*ForCausalLM``
adds ``load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
attention_mask)`` (its own module's function) as ``aux_loss``. The fused path runs the decoder
alone, which returns the router logits but not that loss, so pyalign computes it the same way:
:class:`RouterAuxLoss`, accepted for a model only after one check on the model itself (its own
forward's ``aux_loss`` against the recipe on its decoder's router logits, on a padded batch of a few
tokens; cached per model and mode). A model whose forward computes it otherwise is refused with
the reason, and its callers keep the model's own forward (the TRL drop-in hands the call back).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pyalign.models.head_eligibility import RngState, close_within


@dataclass(frozen=True)
class RouterAuxLoss:
    """``function(router_logits, num_experts, top_k, attention_mask)``: the model's own recipe."""

    function: Callable
    num_experts: int
    top_k: int

    def __call__(self, router_logits, attention_mask: Tensor | None) -> Tensor:
        return self.function(router_logits, self.num_experts, self.top_k, attention_mask)


def _candidate(inner) -> tuple[RouterAuxLoss | None, str]:
    function = getattr(sys.modules.get(type(inner).__module__), "load_balancing_loss_func", None)
    num_experts, top_k = getattr(inner, "num_experts", None), getattr(inner, "num_experts_per_tok", None)
    if function is None or not isinstance(num_experts, int) or not isinstance(top_k, int):
        return None, (f"{type(inner).__name__} has no load_balancing_loss_func in its module, or no integer "
                      "num_experts / num_experts_per_tok")
    return RouterAuxLoss(function, num_experts, top_k), ""


def _check(inner, decoder, recipe: RouterAuxLoss, call) -> str:
    embeddings = inner.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    input_ids = ((torch.arange(12) * 7 + 3) % rows).view(2, 6).to(embeddings.weight.device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0  # the loss averages over unpadded tokens: padding must count right
    rng = RngState(input_ids.device)
    with torch.no_grad():
        try:
            expected = getattr(call(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True,
                                    use_cache=False), "aux_loss", None)
        finally:
            rng.restore()
        try:
            router_logits = getattr(decoder(input_ids=input_ids, attention_mask=attention_mask,
                                            output_router_logits=True, use_cache=False), "router_logits", None)
        finally:
            rng.restore()
        if not isinstance(expected, Tensor) or router_logits is None:
            return "the model's forward returns no aux_loss, or its decoder no router_logits, for output_router_logits"
        got = recipe(router_logits, attention_mask)
    if not isinstance(got, Tensor) or not close_within(got.reshape(expected.shape).to(expected.dtype), expected, 64.0):
        return ("the model's aux_loss is not load_balancing_loss_func(router_logits, num_experts, "
                "num_experts_per_tok, attention_mask) of its decoder's router logits")
    return ""


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def router_aux_loss_or_reason(inner, decoder, *, forward=None) -> tuple[RouterAuxLoss | None, str]:
    """The model's router load-balancing loss as a function of its decoder's router logits and the
    attention mask, or ``(None, reason)``. ``inner``: the transformers model (peft unwrapped);
    ``forward``: what runs its forward for the check (None: ``inner``; a caller inside the model's
    forward passes the unhooked one)."""
    recipe, reason = _candidate(inner)
    if recipe is None:
        return None, reason
    results = _checked.setdefault(inner, {})
    key = (inner.training, recipe.num_experts, recipe.top_k)
    if key not in results:
        try:
            reason = _check(inner, decoder, recipe, forward if forward is not None else inner)
        except Exception as err:  # noqa: BLE001  (any failure of the check is a refusal, with its reason)
            reason = f"the check of the model's aux_loss failed: {type(err).__name__}: {err}"
        results[key] = reason
    return (None, results[key]) if results[key] else (recipe, "")
