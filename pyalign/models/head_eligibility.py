"""Whether the fused lm_head computes exactly a causal LM's log-probs: decided from the model itself.

A ``*ForCausalLM`` qualifies when its logits are ``transform(lm_head(h))``, with ``h`` its decoder's
(base model's) last hidden state, ``lm_head`` a linear map whose weight pyalign can form and
``transform`` a scale and/or a soft-cap (:mod:`pyalign.models.head_recipes`). No list of model
types: two automatic steps decide, and what they cannot prove is refused with the reason (callers
then use the model's own logits).

1. **Structure**: the lm_head module's weight can be formed (a ``torch.nn.Linear``, or a peft LoRA /
   ``modules_to_save`` / trainable-tokens wrapper of one), no hooks the fused path would skip, and
   the candidate transforms the config's fields name.
2. **A check on the model itself**, once per model instance and head state (cached): the model's own
   forward on a few tokens, with the lm_head replaced for that call by a probe that records its
   input and returns known values spanning ``[-K, K]`` (K past every soft-cap candidate). Then
   - the lm_head was called once, on ``[1, T, H]``;
   - the model's logits are ``transform(probe)`` for a candidate (identity first), element by
     element, every vocabulary column included: anything else the forward does after the lm_head
     (another formula, a slice, a mask) fails here;
   - the recorded input is the decoder's own last hidden state (the fused path runs the decoder
     alone), under the same random state (dropout);
   - for a peft-wrapped head, the module's output on that input is ``F.linear`` of the weight and
     bias pyalign forms (LoRA dropout or an unknown variant fails here).
   Under FSDP2 (``sharded``) the check goes through the model's own call (collective: every process
   makes it, as every process makes the fused call), the hidden state is what reaches the lm_head
   by construction, and only the identity transform is accepted (the sharded path returns the
   log-probs through the model's forward, which would transform them). Under DeepSpeed ZeRO-3 no
   check forward runs (a forward nested in the model's call breaks DeepSpeed's module trace): a
   config naming a transform is refused, and the sharded path's check of every call (the lm_head
   called once, its output returned unchanged) stands in for it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyalign.models.head_recipes import (
    HeadTransform, describe, head_params_or_reason, is_linear, op_takes_transform, transform_candidates,
)
from pyalign.models.head_sharding import (
    fsdp_lazy_init, fsdp_manages, is_fsdp_hook, is_zero3_hook, is_zero3_param, module_path, operands,
)

PROBE_TOKENS = 6
_CACHE_ENTRIES = 8  # head states kept per model (train / eval, adapters on / off, ...)


@dataclass(frozen=True)
class FusedHead:
    """The pieces the fused path needs: the decoder (base model), the lm_head and what the model
    does to its output.

    ``params()`` forms ``(weight, bias)`` at the call (for a peft-wrapped head the effective weight,
    differentiable w.r.t. the adapter's parameters). ``sharded``: FSDP2 (or, for a caller that asked
    for it, DeepSpeed ZeRO-3) manages the lm_head weight; the fused path then goes through the
    model's own forward (``weight`` and ``bias`` are what the module held when the head was
    resolved, possibly a DTensor or an empty ZeRO-3 partition: read ``module.weight`` at the call).
    ``manager``: ``"fsdp2"`` or ``"zero3"`` when sharded, else ``""``."""

    decoder: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    module: torch.nn.Module | None = None
    sharded: bool = False
    manager: str = ""
    transform: HeadTransform = field(default_factory=HeadTransform)
    params_fn: Callable[[], tuple[Tensor, Tensor | None]] | None = None

    def params(self) -> tuple[Tensor, Tensor | None]:
        return self.params_fn() if self.params_fn is not None else (self.weight, self.bias)


# --------------------------------------------------------------------------- step 2: the check


class _ProbeHead(torch.nn.Module):
    """Stands in for the lm_head during the check: records its input and returns the probe. The
    real head stays registered as a child (FSDP2's first-forward scan must still find it) and its
    weight stays readable (some forwards cast the hidden state to ``lm_head.weight.dtype``)."""

    def __init__(self, head: torch.nn.Module, bound: float):
        super().__init__()
        self.head = head
        self.bound = bound
        self.inputs: list[Tensor] = []
        self.probe: Tensor | None = None

    @property
    def weight(self):
        return self.head.weight

    @property
    def bias(self):
        return self.head.bias

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        self.inputs.append(hidden)
        vocab = getattr(self.head, "out_features", None) or self.head.weight.shape[0]
        shape = (*hidden.shape[:-1], vocab)
        count = math.prod(shape)
        # Distinct values over [-K, K] in a fixed scrambled order (every column differs, so a slice
        # or a column mask shows); float32 whatever the model's dtype, so that the check is precise.
        order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
        values = torch.linspace(-self.bound, self.bound, count)[order]
        self.probe = values.view(shape).to(hidden.device)
        return self.probe


class RngState:
    """The CPU and one accelerator's random state, restored on demand: the check's forwards see
    the same dropout masks, and the caller's random stream is left as it was."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.cuda.set_rng_state(self.accelerator, self.device)


def close_within(got: Tensor, expected: Tensor, ulps: float) -> bool:
    """Equal within ``ulps`` roundings of ``got``'s dtype, relative to the largest magnitude."""
    if got.shape != expected.shape or not got.dtype.is_floating_point:
        return False
    expected = expected.double()
    bound = ulps * torch.finfo(got.dtype).eps * max(1.0, expected.abs().max().item())
    return (got.double() - expected).abs().max().item() <= bound


def _outputs_tensor(outputs, name: str) -> Tensor:
    if hasattr(outputs, name):
        return getattr(outputs, name)
    return outputs[0]


def check_head(model, inner, head: torch.nn.Module, decoder: torch.nn.Module | None,
               params_fn, candidates: list[HeadTransform], *, forward=None) -> tuple[HeadTransform | None, str]:
    """Step 2 of the module docstring: ``(transform, "")`` or ``(None, reason)``. ``decoder`` None:
    the sharded path (no hidden-state or weight check)."""
    path = module_path(inner, head)
    if not path:
        return None, "the lm_head is not a submodule of the model"
    parent, name = path[-1]
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(inner, "config", None), "vocab_size", None)
    weight = getattr(embeddings, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else next(inner.parameters()).device
    if not rows:
        return None, "the check could not find the vocabulary size (input embeddings)"
    input_ids = ((torch.arange(PROBE_TOKENS) * 7 + 3) % rows).unsqueeze(0).to(device)
    caps = [c.softcap for c in candidates if c.softcap is not None]
    probe_head = _ProbeHead(head, bound=max([16.0] + [3.0 * cap for cap in caps]))
    call = forward if forward is not None else model
    rng = RngState(device)
    try:
        fsdp_lazy_init(model)
        with torch.no_grad():
            parent._modules[name] = probe_head
            try:
                outputs = call(input_ids=input_ids, use_cache=False)
            finally:
                parent._modules[name] = head
                rng.restore()
            if len(probe_head.inputs) != 1:
                return None, (f"the model's forward called its lm_head {len(probe_head.inputs)} times "
                              "(the fused path computes one lm_head(last hidden state))")
            hidden = probe_head.inputs[0]
            if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
                return None, (f"the lm_head's input has shape {tuple(hidden.shape)}, not the hidden states "
                              f"[1, {PROBE_TOKENS}, H] of every position")
            logits = _outputs_tensor(outputs, "logits")
            if not isinstance(logits, Tensor) or logits.shape != probe_head.probe.shape:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                return None, (f"the model returns logits of shape {got} from an lm_head output of shape "
                              f"{tuple(probe_head.probe.shape)} (sliced or reshaped after the lm_head)")
            expected = probe_head.probe.double()
            transform = next((c for c in candidates if close_within(logits, c.apply(expected), 8.0)), None)
            if transform is None:
                named = ", ".join(str(c) for c in candidates)
                return None, ("the model's logits are not transform(lm_head(h)) for any transform its config "
                              f"names ({named}): its forward computes something else after the lm_head")
            if decoder is None:
                return transform, ""
            scales = sorted({c.scale for c in candidates}, key=lambda scale: scale != 1.0)
            hidden_scale, reason = _check_hidden_and_weight(decoder, head, params_fn, input_ids, hidden, rng, scales)
    except Exception as err:  # noqa: BLE001  (any failure of the check is a refusal, with its reason)
        return None, f"the check of the model's forward failed: {type(err).__name__}: {err}"
    if reason:
        return None, reason
    return HeadTransform(transform.scale * hidden_scale, transform.softcap), ""


def _check_hidden_and_weight(decoder, head, params_fn, input_ids: Tensor, hidden: Tensor, rng: RngState,
                             scales: list[float]) -> tuple[float, str]:
    """``(c, "")`` when the lm_head's input is ``c`` times the decoder's last hidden state (``c`` a
    scale the config names; MiniCPM3 divides by logits_scaling there) and the head computes
    ``F.linear`` of the weight pyalign forms; else ``(0, reason)``."""
    try:
        outputs = decoder(input_ids=input_ids, use_cache=False)
    finally:
        rng.restore()
    last = _outputs_tensor(outputs, "last_hidden_state")
    if not isinstance(last, Tensor) or last.shape != hidden.shape:
        return 0.0, (f"the lm_head's input has shape {tuple(hidden.shape)}, the decoder's last_hidden_state "
                     f"{tuple(last.shape) if isinstance(last, Tensor) else type(last).__name__}")
    last = last.to(hidden.dtype)
    weight, bias = params_fn()
    # Without a bias, lm_head(c * h) = c * lm_head(h): a scale of the hidden state is a logit scale.
    hidden_scale = next((c for c in (scales if bias is None else [1.0]) if close_within(last * c, hidden, 4.0)), None)
    if hidden_scale is None:
        return 0.0, ("the hidden state the model feeds its lm_head is not its decoder's last_hidden_state (nor a "
                     "scale of it the config names): the forward changes it between the decoder and the lm_head")
    if is_linear(head):
        return hidden_scale, ""
    try:
        got = head(hidden)
    finally:
        rng.restore()
    expected = torch.nn.functional.linear(*operands(hidden, weight, bias))
    # Two ways of rounding the same product: a few roundings of a half dtype, more of float32
    # (the sum over H).
    ulps = 256.0 if torch.finfo(expected.dtype).eps < 1e-6 else 8.0
    if not close_within(got.to(expected.dtype), expected, ulps):
        return 0.0, (f"lm_head ({describe(head)}) does not compute F.linear of the weight pyalign forms from it "
                     "(an adapter variant, dropout, or another layer)")
    return hidden_scale, ""


def _state_key(inner, head, candidates, sharded: bool) -> tuple:
    device_type = next(iter(head.parameters()), torch.empty(0)).device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    adapters = tuple((type(m).__name__, bool(getattr(m, "disable_adapters", False)),
                      tuple(getattr(m, "active_adapters", ()) or ()), bool(getattr(m, "merged", False)))
                     for m in head.modules() if hasattr(m, "active_adapters"))
    dtypes = tuple(sorted({str(p.dtype) for p in head.parameters()}))
    return (id(head), type(head), inner.training, head.training, tuple(candidates), sharded, autocast, adapters,
            dtypes)


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checked_transform(model, inner, head, decoder, params_fn, candidates, *, sharded: bool,
                      forward=None) -> tuple[HeadTransform | None, str]:
    """:func:`check_head`, once per model instance and head state."""
    key = _state_key(inner, head, candidates, sharded)
    results = _checked.setdefault(inner, {})
    if key not in results:
        if len(results) >= _CACHE_ENTRIES:
            results.clear()
        results[key] = check_head(model, inner, head, None if sharded else decoder, params_fn, candidates,
                                  forward=forward)
    return results[key]


# --------------------------------------------------------------------------- the decision


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


def decoder_of(inner) -> torch.nn.Module | None:
    """The base model the fused path runs alone (the check proves it is the one feeding the lm_head):
    ``base_model_prefix``'s, else ``get_decoder()``, else ``.model`` (Llama 4's text model names a
    prefix it does not use)."""
    candidates = [getattr(inner, getattr(inner, "base_model_prefix", ""), None)]
    try:
        candidates.append(inner.get_decoder() if hasattr(inner, "get_decoder") else None)
    except Exception:  # noqa: BLE001  (transformers raises for models without a rule; none then)
        pass
    candidates.append(getattr(inner, "model", None))
    return next((m for m in candidates if isinstance(m, torch.nn.Module) and m is not inner), None)


def fused_head_or_reason(model, *, sharded: bool = False, zero3: bool = False,
                         forward=None) -> tuple[FusedHead | None, str]:
    """``(FusedHead, "")`` when the fused path computes exactly the model's log-probs, else
    ``(None, reason)`` (module docstring: the structure, then a check on the model, cached).

    ``sharded``: whether the caller handles an lm_head that FSDP2 manages (``FusedHead.sharded``:
    through ``sharded_token_logprobs``, never the decoder alone). A caller that does not (the
    default) gets ``(None, reason)`` for such a model and computes the model's own logits.
    ``zero3``: whether the caller handles an lm_head that DeepSpeed ZeRO-3 partitions (through
    ``sharded_token_logprobs``, "gather"); without it ZeRO-3's module hooks count as hooks the
    fused path would skip. ``forward``: what runs the model's forward for the check (None: the
    model itself); a caller already inside the model's forward passes the unhooked forward."""
    inner, reason = _unwrap_peft(model)
    if reason:
        return None, reason
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, torch.nn.Module):
        return None, "the model has no lm_head (get_output_embeddings() gives none)"
    decoder = decoder_of(inner)
    if decoder is None:
        return None, "the base (decoder) model could not be found (base_model_prefix, get_decoder())"
    weight = getattr(head, "weight", None)
    zero3_head = zero3 and is_linear(head) and is_zero3_param(weight)
    hooks = [hook for module in head.modules()
             for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
             if not is_fsdp_hook(hook) and not (zero3_head and is_zero3_hook(hook))]
    if hooks:
        return None, "lm_head has forward hooks (e.g. accelerate offloading) the fused path would skip"
    manager = ""
    if zero3_head:
        if not any(is_zero3_hook(hook) for hook in head._forward_pre_hooks.values()):
            # Partitioned by deepspeed.zero.Init but not (yet) under an engine: nothing would
            # all-gather the weight for the lm_head's forward.
            return None, ("DeepSpeed ZeRO-3 partitions the lm_head weight but no ZeRO-3 engine hooks the lm_head "
                          "module (wrap the model with deepspeed.initialize / accelerate first)")
        manager = "zero3"
    elif isinstance(weight, Tensor) and fsdp_manages(model, head):
        if not sharded:
            return None, ("FSDP2 manages the lm_head (its root forward must run to all-gather the embeddings and "
                          "final norm); pyalign.models.fused_head's causal_lm_sequence_logprobs and "
                          "causal_lm_preference_loss handle it (sharded_head)")
        manager = "fsdp2"
    if manager and not is_linear(head):
        return None, f"lm_head is {describe(head)} under {manager}; the sharded fused path takes a torch.nn.Linear"
    params_fn, reason = head_params_or_reason(head)
    if reason:
        return None, reason
    if not manager:
        weight, _ = params_fn()
        if not weight.dtype.is_floating_point:
            return None, f"lm_head.weight has dtype {weight.dtype}"
    candidates = transform_candidates(getattr(inner, "config", None))
    if manager == "zero3":
        # DeepSpeed's parameter coordinator traces the order modules run in; a second forward nested
        # in the model's own call (where the TRL drop-in is) breaks its trace. So no check forward
        # here: the sharded path checks every call instead (the lm_head called once, its output
        # returned unchanged), which proves the identity transform, and a config that names another
        # one is refused up front.
        if len(candidates) > 1:
            named = ", ".join(str(c) for c in candidates[1:])
            return None, (f"DeepSpeed ZeRO-3 partitions the lm_head and the config names a logit transform ({named}); "
                          "the sharded fused path takes the identity only")
        transform = candidates[0]
    else:
        transform, reason = checked_transform(model, inner, head, decoder, params_fn, candidates,
                                              sharded=bool(manager), forward=forward)
    if transform is None:
        return None, reason
    if not transform.identity:
        if manager:
            return None, (f"the model's logits are {transform} of lm_head(h), and the sharded fused path "
                          f"({manager}) returns the log-probs through the model's forward, which would apply it")
        if not op_takes_transform():
            return None, (f"the model's logits are {transform} of lm_head(h), and this pyalign's "
                          "linear_token_logprobs takes no logit_scale / softcap")
    return FusedHead(decoder, head.weight, getattr(head, "bias", None), module=head, sharded=bool(manager),
                     manager=manager, transform=transform, params_fn=params_fn), ""
