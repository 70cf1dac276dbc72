"""transformers causal LMs through the fused lm_head: no ``[B, T, V]`` logits tensor.

A Llama-style ``*ForCausalLM`` computes ``logits = lm_head(decoder(...).last_hidden_state)``. Here
the decoder (the base model, final norm included) runs alone, and its hidden states go with the
lm_head weight to :func:`pyalign.linear_token_logprobs` / the fused-linear ``PreferenceLoss``.

Works with peft LoRA models (adapters on attention / MLP layers live inside the decoder; the
PeftModel wrapper is unwrapped), tied embeddings (the lm_head weight is the embedding matrix, and
autograd sums both uses), gradient checkpointing, and autocast (hidden states and weight are cast
to the autocast dtype, as ``F.linear`` under autocast would). Falls back to the model's own
logits, with the reason logged once, when the fused path would not compute the same thing:

- lm_head is not a plain ``torch.nn.Linear``: adapted by LoRA (``"lm_head"`` in target_modules),
  wrapped by peft's ``modules_to_save`` or ``trainable_token_indices`` (with tied embeddings),
  quantised, or carrying forward hooks (e.g. accelerate offloading);
- the model type is not one whose forward is known to be exactly ``lm_head(last_hidden_state)``
  (:data:`FUSED_MODEL_TYPES`; e.g. Gemma 2/3 soft-cap the logits, Granite and Cohere scale them);
- a prompt-learning peft adapter (it changes the inputs, not layers).

Labels follow the transformers convention: ``labels`` ``[B, T]`` are token ids aligned with
``input_ids`` (``ignore_index`` where not scored); position t's hidden state predicts
``labels[:, t + 1]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pyalign.losses.pairwise import LossOutput
from pyalign.losses.preference_loss import PreferenceLoss
from pyalign.ops.linear_token_logprobs import linear_token_logprobs
from pyalign.ops.token_logprobs import sequence_logprobs
from pyalign.reference import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Model types whose ``*ForCausalLM.forward`` computes ``logits = self.lm_head(hidden_states)`` from
# the base model's last hidden state and nothing after it (checked against the installed
# transformers by tests/test_hf_integration.py). Add a type here only after checking its forward.
FUSED_MODEL_TYPES = {
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "phi3", "gemma", "smollm3", "olmo2", "starcoder2", "glm4",
}
# Config fields that, when set, post-process the logits (defensive: checked even for listed types).
LOGIT_POSTPROCESSING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
FUSED_CHOICES = ("auto", True, False)

_warned: set[str] = set()


@dataclass(frozen=True)
class FusedHead:
    """The pieces the fused path needs: the decoder (base model) and the lm_head parameters."""

    decoder: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None


def _unwrap_peft(model) -> tuple[torch.nn.Module, str]:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it), or a reason
    why the wrapper changes more than layers."""
    try:
        import peft  # noqa: PLC0415
    except ImportError:
        return model, ""
    if isinstance(model, peft.PeftModel):
        config = model.peft_config.get(model.active_adapter)
        if config is not None and config.is_prompt_learning:
            return model, f"the peft adapter is prompt learning ({config.peft_type}), which changes the inputs"
        return model.get_base_model(), ""
    if isinstance(model, peft.tuners.tuners_utils.BaseTuner):
        return model.model, ""
    return model, ""


def fused_head_or_reason(model) -> tuple[FusedHead | None, str]:
    """``(FusedHead, "")`` when the fused path computes exactly the model's logits, else
    ``(None, reason)``."""
    inner, reason = _unwrap_peft(model)
    if reason:
        return None, reason
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return None, (f"model type {model_type!r} is not in pyalign.models.fused_head.FUSED_MODEL_TYPES "
                      "(models whose logits are exactly lm_head(last hidden state))")
    for field in LOGIT_POSTPROCESSING_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            return None, f"config.{field}={value!r} post-processes the logits"
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not torch.nn.Linear:
        kind = "missing" if head is None else f"a {type(head).__module__}.{type(head).__qualname__}"
        return None, (f"lm_head is {kind}, not a plain torch.nn.Linear (adapted by LoRA, wrapped by "
                      "peft modules_to_save / trainable_token_indices, or quantised)")
    if head._forward_hooks or head._forward_pre_hooks:
        return None, "lm_head has forward hooks (e.g. accelerate offloading) the fused path would skip"
    if not head.weight.dtype.is_floating_point:
        return None, f"lm_head.weight has dtype {head.weight.dtype}"
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module):
        return None, "the base (decoder) model could not be found"
    return FusedHead(decoder, head.weight, head.bias), ""


def _resolve(model, fused) -> FusedHead | None:
    """The FusedHead to use, None for the logits path; ``fused=True`` raises when unsupported."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused: expected one of {FUSED_CHOICES}, got {fused!r}")
    if fused is False:
        return None
    head, reason = fused_head_or_reason(model)
    if head is None:
        if fused is True:
            raise ValueError(f"fused: the fused lm_head path cannot run this model: {reason}")
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("pyalign: computing full logits instead of the fused lm_head: %s", reason)
    return head


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``labels[:, 1:]`` padded with ``ignore_index``: aligned with every hidden state, so the
    hidden states need no shifted copy (the last position is simply not scored)."""
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _compute_operands(hidden: Tensor, head: FusedHead):
    """Hidden states and lm_head parameters in the dtype the model's lm_head would compute in."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def causal_lm_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                            *, head: FusedHead | None = None, **model_kwargs) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm) of a supported causal LM."""
    if head is None:
        head = _resolve(model, True)
    model_kwargs.setdefault("use_cache", False)
    outputs = head.decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def causal_lm_sequence_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    fused: bool | str = "auto",
    mode: str = "default",
    backend: str = "auto",
    **model_kwargs,
) -> Tensor:
    """Sequence log-probs ``[B]`` (float32) of ``labels`` under ``model``; ``average=True``: mean
    over scored tokens. Drop-in for ``sequence_logprobs(model(...).logits[:, :-1], labels[:, 1:])``.

    ``fused``: ``"auto"`` (fused lm_head when the model allows it, else the logits with a logged
    reason), ``True`` (fused or ValueError), ``False`` (logits). ``mode``: of
    :func:`pyalign.linear_token_logprobs`.
    """
    head = _resolve(model, fused)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **model_kwargs).logits
        return sequence_logprobs(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index,
                                 average=average, backend=backend)
    hidden = causal_lm_hidden_states(model, input_ids, attention_mask, head=head, **model_kwargs)
    hidden, weight, bias = _compute_operands(hidden, head)
    targets = shift_labels(labels, ignore_index)
    token_logps = linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                        mode=mode, backend=backend)
    total = token_logps.sum(-1)
    if not average:
        return total
    return total / (targets != ignore_index).sum(-1).clamp(min=1).to(total.dtype)


def causal_lm_preference_loss(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    loss: str | PreferenceLoss = "dpo",
    *,
    ref_logps: Tensor | None = None,
    chain_logps: Tensor | None = None,
    fused: bool | str = "auto",
    mode: str = "default",
    memory_budget: int | None = None,
    grad_filter: float | None = None,
    model_kwargs: dict | None = None,
    **loss_kwargs,
) -> LossOutput:
    """A preference loss on a batch of ``2B`` rows (chosen rows first, then rejected).

    ``loss``: a :class:`pyalign.PreferenceLoss`, or a loss name with its options in
    ``loss_kwargs`` (``beta=...``, ...). ``fused``: as for :func:`causal_lm_sequence_logprobs`;
    ``mode``, ``memory_budget``, ``grad_filter``: of the fused-linear preference loss.
    """
    if isinstance(loss, str):
        loss = PreferenceLoss(loss, **loss_kwargs)
    elif loss_kwargs:
        raise ValueError(f"{next(iter(loss_kwargs))}: loss options go to PreferenceLoss when loss is one")
    model_kwargs = dict(model_kwargs or {})
    head = _resolve(model, fused)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **model_kwargs).logits
        return loss(logits[:, :-1], labels[:, 1:], ref_logps, chain_logps)
    hidden = causal_lm_hidden_states(model, input_ids, attention_mask, head=head, **model_kwargs)
    hidden, weight, bias = _compute_operands(hidden, head)
    return loss(labels=shift_labels(labels, loss.ignore_index), ref_logps=ref_logps,
                chain_logps=chain_logps, hidden=hidden, weight=weight, bias=bias, mode=mode,
                memory_budget=memory_budget, grad_filter=grad_filter)


def policy_sequence_logprobs(
    model, batch: dict[str, Tensor], *, average: bool = False, fused: bool | str = "auto"
) -> Tensor:
    """Sequence log-probs ``[2B]`` of the batch's responses under ``model``.

    The one place where log-probs come from a model: logits at position t predict token t+1,
    so logits[:, :-1] pair with labels[:, 1:]. ``fused``: through the fused lm_head (hidden
    states x lm_head weight, never materialising the [B, T, V] logits) when the model allows it
    (see :mod:`pyalign.models.fused_head`).
    """
    return causal_lm_sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], average=average, fused=fused
    )


def response_token_counts(batch: dict[str, Tensor]) -> Tensor:
    """Scored tokens per row ``[2B]`` (for the length-normalised NLL term)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
