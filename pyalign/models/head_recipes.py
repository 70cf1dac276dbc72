"""What a causal LM's head is: the transform after the lm_head, and the weight of the lm_head.

The transform (:class:`HeadTransform`): ``z = scale * logits``, then, with a soft-cap,
``softcap * tanh(z / softcap)``, the form :func:`pyalign.linear_token_logprobs` applies chunk by
chunk (``logit_scale=``, ``softcap=``). Its candidates come from the config's fields
(:data:`SCALE_FIELDS`, :data:`SOFTCAP_FIELDS`): a field names a value, never a family, and
:mod:`pyalign.models.head_eligibility` checks on the model which candidate (if any) its forward
applies.

The weight (:func:`head_params_or_reason`): a ``torch.nn.Linear``'s own, or the effective weight of
a peft wrapper, formed at the call so that autograd carries its gradient to the adapter: LoRA
``W + scaling * B A`` (as peft's ``base(x) + B(A(x)) * scaling``), ``modules_to_save`` (the copy in
use), ``trainable_token_indices`` (the merged weight). Anything else is refused by class.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pyalign.models.head_sharding import unwrapped_class
from pyalign.ops.linear_token_logprobs import linear_token_logprobs

# Config fields that scale the logits (or the hidden state fed to a bias-free lm_head: the same),
# with the operation: Granite divides the logits by logits_scaling, MiniCPM3 the hidden state,
# HyperCLOVA X multiplies by it; so each operation is a candidate and the check picks.
SCALE_FIELDS = {"logit_scale": ("*",), "output_multiplier": ("*",), "lm_head_multiplier": ("*",),
                "logits_scaling": ("/", "*"), "logits_mup_width_multiplier": ("/",)}
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@dataclass(frozen=True)
class HeadTransform:
    """What the model does to ``lm_head(h)``: ``z = scale * logits``; then, with ``softcap``,
    ``softcap * tanh(z / softcap)``."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def op_options(self) -> dict:
        """Keywords for :func:`pyalign.linear_token_logprobs` (none for the identity)."""
        return {} if self.identity else {"logit_scale": self.scale, "softcap": self.softcap}

    def apply(self, logits: Tensor) -> Tensor:
        z = logits * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def __str__(self) -> str:
        parts = ([] if self.scale == 1.0 else [f"scale {self.scale:g}"]) + (
            [] if self.softcap is None else [f"soft-cap {self.softcap:g}"])
        return ", ".join(parts) or "identity"


def op_takes_transform() -> bool:
    """Whether this pyalign's fused op takes ``logit_scale`` and ``softcap``."""
    parameters = inspect.signature(linear_token_logprobs).parameters
    return "logit_scale" in parameters and "softcap" in parameters


# --------------------------------------------------------------------------- step 1: structure


def _number(config, name: str) -> float | None:
    """A field's value when it is a finite positive number; anything else cannot be a scale or a
    cap of the op's form (if the forward used it anyway, the check finds no candidate and refuses)."""
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def transform_candidates(config) -> list[HeadTransform]:
    """The transforms the config's fields allow, identity first."""
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scales, softcaps = [1.0], [None]
    for name, operations in SCALE_FIELDS.items():
        value = _number(config, name)
        for operation in operations if value is not None else ():
            candidate = 1.0 / value if operation == "/" else value
            if candidate not in scales:
                scales.append(candidate)
    for name in SOFTCAP_FIELDS:
        value = _number(config, name)
        if value is not None and value not in softcaps:
            softcaps.append(value)
    return [HeadTransform(scale, cap) for cap in softcaps for scale in scales]


def _peft_classes():
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: PLC0415
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper  # noqa: PLC0415
    except ImportError:
        return None
    return LoraLinear, ModulesToSaveWrapper, TrainableTokensWrapper


def describe(module) -> str:
    cls = type(module)
    return f"a {cls.__module__}.{cls.__qualname__}"


def is_linear(module) -> bool:
    return module is not None and unwrapped_class(module) is torch.nn.Linear


def _lora_params(module) -> tuple[Tensor, Tensor | None]:
    """``W + sum over active adapters of scaling * B A`` (and the bias), as peft's forward computes
    ``base(x) + B(A(x)) * scaling``; summed in the adapters' dtype, stored in the base's."""
    base = module.base_layer
    weight, bias = base.weight, base.bias
    if module.disable_adapters or module.merged:
        return weight, bias
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return weight, bias
    dtype = module.lora_A[active[0]].weight.dtype
    total = weight.to(dtype)
    total_bias = None if bias is None else bias.to(dtype)
    for name in active:
        scaling = module.scaling[name]
        lora_b = module.lora_B[name]
        total = total + (lora_b.weight @ module.lora_A[name].weight) * scaling
        if lora_b.bias is not None:
            total_bias = (lora_b.bias * scaling if total_bias is None else total_bias + lora_b.bias * scaling)
    return total.to(weight.dtype), None if total_bias is None else total_bias.to(weight.dtype)


def _lora_reason(module) -> str:
    if not is_linear(module.base_layer):
        return f"lm_head is LoRA on {describe(module.base_layer)}, not on a torch.nn.Linear (quantised?)"
    if getattr(module, "fan_in_fan_out", False):
        return "lm_head is LoRA with fan_in_fan_out=True"
    active = [name for name in module.active_adapters if name in module.lora_A]
    variants = [name for name in active if name in getattr(module, "lora_variant", {})]
    if variants and not (module.disable_adapters or module.merged):
        return f"lm_head is LoRA with a variant (DoRA or another) on adapter(s) {variants}"
    if module.training and not (module.disable_adapters or module.merged):
        for name in active:
            dropout = module.lora_dropout[name]
            if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 0) > 0:
                return (f"lm_head is LoRA with lora_dropout={dropout.p} active (training): its output is not "
                        "linear in a fixed weight")
    return ""


def _active_copy(wrapper):
    """The module a peft ``ModulesToSaveWrapper`` runs now (its forward's choice)."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(name not in wrapper.modules_to_save for name in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _tokens_params(wrapper) -> tuple[Tensor, Tensor | None]:
    layer = wrapper.token_adapter
    base = layer.base_layer
    active = layer.active_adapters
    if layer.disable_adapters or not active or layer.merged:
        return base.weight, base.bias
    return layer.get_merged_weights(active), base.bias


def head_params_or_reason(module) -> tuple[Callable[[], tuple[Tensor, Tensor | None]] | None, str]:
    """A function forming the head's ``(weight, bias)`` at the call, or ``(None, reason)``."""
    if is_linear(module):
        return (lambda: (module.weight, module.bias)), ""
    classes = _peft_classes()
    if classes is not None:
        lora_linear, modules_to_save, trainable_tokens = classes
        if type(module) is lora_linear:
            reason = _lora_reason(module)
            return (None, reason) if reason else ((lambda: _lora_params(module)), "")
        if isinstance(module, modules_to_save):
            copies = [module.original_module, *module.modules_to_save.values()]
            if not all(is_linear(copy) for copy in copies):
                return None, "lm_head is wrapped by peft modules_to_save around a module that is not a torch.nn.Linear"
            return (lambda: (_active_copy(module).weight, _active_copy(module).bias)), ""
        if isinstance(module, trainable_tokens):
            if not is_linear(module.token_adapter.base_layer):
                return None, "lm_head has peft trainable tokens on a module that is not a torch.nn.Linear"
            return (lambda: _tokens_params(module)), ""
    return None, (f"lm_head is {describe(module)}, not a torch.nn.Linear or a peft LoRA / modules_to_save / "
                  "trainable-tokens wrapper of one (quantised heads are refused)")
