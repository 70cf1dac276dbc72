"""Who shards the lm_head: FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3, read from the model.

The fused lm_head (:mod:`pyalign.models.fused_head`) reads the lm_head weight directly when it is
whole; under FSDP2 it is a DTensor split along the vocabulary, under ZeRO-3 an empty partition
outside the module's forward, so the fused path must then go through the model's own forward
(``sharded_token_logprobs``). These helpers tell which case a model is in, and read FSDP2's record
of the weight (its sharded parameter, the gradient divide factor, the mixed-precision dtype) that
the vocabulary-parallel op needs to write the gradient as FSDP's reduce-scatter would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fsdp_module_class():
    """``torch.distributed.fsdp.FSDPModule`` (FSDP2), or None where torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:
        return None
    return FSDPModule


def fsdp_lazy_init(model: torch.nn.Module) -> None:
    """Run FSDP2's lazy initialisation of the root (the outermost FSDP2 module) now, as its first
    forward would: it names every parameter group by its module path, so a forward that swaps a
    module (the eligibility check's probe) must not be that first forward."""
    fsdp_module = fsdp_module_class()
    root = next((m for m in model.modules() if fsdp_module is not None and isinstance(m, fsdp_module)), None)
    if root is None:
        return
    try:
        root._get_fsdp_state()._lazy_init()
    except AttributeError as err:
        raise RuntimeError(f"pyalign: this torch's FSDP2 state is not the one pyalign reads ({err})") from err


def is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(value, DTensor)


def unwrapped_class(module: torch.nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps it for a subclass ``FSDP<Class>(FSDPModule, Class)``."""
    fsdp_module = fsdp_module_class()
    if fsdp_module is not None and isinstance(module, fsdp_module):
        for cls in type(module).__mro__[1:]:
            if not issubclass(cls, fsdp_module):
                return cls
    return type(module)


def is_fsdp_hook(hook) -> bool:
    """FSDP2's own forward hooks (they unshard / reshard the module's parameters): the fused path
    runs them itself (sharded_head="gather") or bypasses the module on purpose ("vocab_parallel")."""
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp.")


def is_zero3_param(param) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``param`` (``deepspeed.zero.Init`` or a stage-3 engine
    gives each such parameter its ``ds_id`` / ``ds_status``; outside the owning module's forward its
    data is an empty partition)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def is_zero3_hook(hook) -> bool:
    """DeepSpeed ZeRO-3's module hooks (all-gather before the module's forward and backward,
    release after, reduce-scatter the gradients): the fused path runs them itself (the lm_head's own
    forward is replaced, the module is still called). Its post-forward hook comes wrapped by
    ``deepspeed.utils.nvtx.instrument_w_nvtx`` (no ``functools.wraps``): the hook is then the
    function in the wrapper's closure."""
    candidates = [hook, getattr(hook, "__wrapped__", None)]
    candidates += [cell.cell_contents for cell in (getattr(hook, "__closure__", None) or ())
                   if callable(getattr(cell, "cell_contents", None))]
    return any(getattr(fn, "__module__", "").startswith("deepspeed.runtime.zero.") for fn in candidates if fn)


def zero3_gathered(param) -> bool:
    """Whether a ZeRO-3 parameter holds its whole data now (inside its module's forward/backward)."""
    return getattr(getattr(param, "ds_status", None), "name", "") == "AVAILABLE"


def module_path(root: torch.nn.Module, target: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``[(parent, child name), ...]`` from ``root`` down to ``target`` (empty if not inside it)."""
    for name, module in root.named_modules():
        if module is target and name:
            path, parent = [], root
            for part in name.split("."):
                path.append((parent, part))
                parent = parent._modules[part]
            return path
    return []


@dataclass(frozen=True)
class FsdpHeadParam:
    """FSDP2's record of the lm_head weight: the sharded DTensor parameter and the factor FSDP
    divides its reduce-scattered gradients by."""

    sharded: torch.nn.Parameter
    divide_factor: float
    param_dtype: torch.dtype | None = None  # MixedPrecisionPolicy's compute dtype, None without one


def fsdp_head_param(model: torch.nn.Module, weight) -> FsdpHeadParam | None:
    """The FSDP2 parameter that manages ``weight`` (the sharded DTensor, or the unsharded tensor FSDP
    registered on the module while its group is unsharded), or None when FSDP2 does not manage it.

    Reads FSDP2's per-module state (``FSDPModule._get_fsdp_state()``, its parameter groups and their
    ``gradient_divide_factor``): torch has no public accessor for which group owns a parameter or
    for the divide factor, and the vocabulary-parallel gradient must be divided exactly as FSDP's
    reduce-scatter would divide it."""
    fsdp_module = fsdp_module_class()
    if fsdp_module is None:
        return None
    for module in model.modules():
        if not isinstance(module, fsdp_module):
            continue
        try:
            groups = module._get_fsdp_state()._fsdp_param_groups
        except AttributeError as err:
            raise RuntimeError(f"pyalign: this torch's FSDP2 state is not the one pyalign reads ({err})") from err
        for group in groups:
            for param in group.fsdp_params:
                if param.sharded_param is weight or getattr(param, "_unsharded_param", None) is weight:
                    mesh = param.sharded_param.device_mesh
                    factor = group.gradient_divide_factor
                    # FSDP's default: the data-parallel size (the mesh's, replicas included for HSDP).
                    return FsdpHeadParam(param.sharded_param, float(factor) if factor else float(mesh.size()),
                                         getattr(param, "param_dtype", None))
    return None


def fsdp_manages(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether FSDP2 manages the lm_head weight: a DTensor now, or a module on the way from the
    model down to the lm_head (the lm_head included) is an FSDP2 module, whose group holds the
    weight (unsharded between a forward and its backward, or after a forward without gradient)."""
    if is_dtensor(head.weight):
        return True
    fsdp_module = fsdp_module_class()
    if fsdp_module is None:
        return False
    if isinstance(model, fsdp_module) or isinstance(head, fsdp_module):
        return True
    if not any(isinstance(module, fsdp_module) for module in model.modules()):
        return False
    if any(isinstance(parent, fsdp_module) for parent, _ in module_path(model, head)):
        return True
    return fsdp_head_param(model, head.weight) is not None


def vocab_parallel_capable(info: FsdpHeadParam | None) -> bool:
    """Whether the weight's FSDP2 layout is the vocabulary split the vocabulary-parallel op takes:
    ``Shard(0)`` on a 1-D mesh (not HSDP's replicated 2-D mesh, not a custom shard placement)."""
    if info is None:
        return False
    from torch.distributed.tensor import Shard  # noqa: PLC0415

    placements = tuple(info.sharded.placements)
    return (info.sharded.device_mesh.ndim == 1 and len(placements) == 1
            and type(placements[0]) is Shard and placements[0].dim == 0)


def operands(hidden, weight, bias, param_dtype: torch.dtype | None = None):
    """``(hidden, weight, bias)`` cast to the dtype the lm_head computes in: autocast's, else
    ``param_dtype`` (the dtype FSDP2's MixedPrecisionPolicy all-gathers a sharded weight in), else
    the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = param_dtype or weight.dtype
    bias = None if bias is None else bias.to(dtype)
    return hidden.to(dtype), weight.to(dtype), bias
