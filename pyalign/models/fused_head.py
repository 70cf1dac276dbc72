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

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the lm_head weight is a DTensor split along the
vocabulary, and the root module's forward hook all-gathers the root's own parameters (embeddings,
final norm, often the lm_head): the decoder cannot be called alone. The fused path then runs the
model's own forward with the lm_head swapped, for that one call, for a module that returns the
token log-probs ``[B, T]`` instead of the logits (``sharded_head``, :data:`SHARDED_HEAD_CHOICES`):

- ``"gather"``: the lm_head's own ``forward`` is replaced, so FSDP's hooks run as for the logits:
  the weight is all-gathered (by the lm_head's group, or already by the root's), the fused op runs
  on the whole weight, FSDP reduce-scatters its gradient and reshards it;
- ``"vocab_parallel"``: the lm_head module is bypassed (its FSDP hooks do not fire), each process
  keeps its slice of the vocabulary and :func:`pyalign.ops.vocab_parallel_logprobs.vocab_parallel_token_logprobs`
  computes the log-softmax across processes (SPEC 3.9). When the lm_head is its own FSDP group the
  weight is never all-gathered and its gradient is written into the DTensor's ``.grad`` as FSDP's
  reduce-scatter would have (divided by FSDP's gradient divide factor); when FSDP has already
  all-gathered it for another module of its group (the root, a tied embedding), the op computes
  on this process's rows of it and FSDP reduce-scatters the gradient as usual;
- ``"auto"``: vocabulary-parallel where the weight stays sharded until the head (the lm_head an
  FSDP group of its own, on a 1-D mesh): measured faster and smaller than gathering it
  (docs/fused_linear.md, "Sharded lm_head (FSDP2)", ``python -m bench.sharded_head``); the whole
  weight where FSDP has all-gathered it anyway (the root's group, grouped with the final norm, a
  tied embedding), since splitting it there only adds communication; "gather" where the weight's
  layout is not a plain vocabulary split (HSDP's 2-D mesh).

``sharded_token_logprobs(..., return_stats=True)`` also returns the statistics of
``linear_token_logprobs(return_stats=True)`` (entropy, mean logit, ..., what TRL's DPOTrainer logs):
they need every logit of a row, so they are computed where the whole weight is, inside the lm_head's
forward ("gather"). A caller that is itself inside the model's forward (the TRL drop-in,
:mod:`pyalign.integrations.trl.fused_head`: the root's FSDP hooks have run) passes ``forward=`` the
model's own forward, so the root's hooks are not run a second time.

DeepSpeed ZeRO-3 works the same way for a caller that asks for it (``fused_head_or_reason(...,
zero3=True)``, the TRL drop-in): ZeRO-3 registers a forward pre-hook (all-gather the module's own
parameters), a forward hook (release them) and backward hooks (gather again for the backward, then
reduce-scatter the gradient) on every module, so the fused op computed in place of the lm_head's
``forward`` gets the lm_head's whole weight and its gradient is partitioned as ``F.linear``'s would
be ("gather"; the weight is never a DTensor, so "vocab_parallel" does not apply).

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
from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs
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
SHARDED_HEAD_CHOICES = ("auto", "gather", "vocab_parallel")
# The strategy "auto" prefers for an FSDP2-sharded lm_head, the one `python -m bench.sharded_head`
# measured best (docs/fused_linear.md, "Sharded lm_head (FSDP2)"); "auto" still uses the whole
# weight where FSDP has gathered it anyway, and "gather" where vocab_parallel cannot apply.
DEFAULT_SHARDED_HEAD = "vocab_parallel"

_warned: set[str] = set()


@dataclass(frozen=True)
class FusedHead:
    """The pieces the fused path needs: the decoder (base model) and the lm_head parameters.

    ``sharded``: FSDP2 (or, for a caller that asked for it, DeepSpeed ZeRO-3) manages the lm_head
    weight; ``module`` is then the lm_head module, and the fused path goes through the model's own
    forward (``weight`` and ``bias`` are what the module held when the head was resolved, possibly a
    DTensor or an empty ZeRO-3 partition: read ``module.weight`` at the call). ``manager``:
    ``"fsdp2"`` or ``"zero3"`` when sharded, else ``""``."""

    decoder: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    module: torch.nn.Module | None = None
    sharded: bool = False
    manager: str = ""


def _fsdp_module_class():
    """``torch.distributed.fsdp.FSDPModule`` (FSDP2), or None where torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:
        return None
    return FSDPModule


def _is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(value, DTensor)


def _unwrapped_class(module: torch.nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps it for a subclass ``FSDP<Class>(FSDPModule, Class)``."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and isinstance(module, fsdp_module):
        for cls in type(module).__mro__[1:]:
            if not issubclass(cls, fsdp_module):
                return cls
    return type(module)


def _is_fsdp_hook(hook) -> bool:
    """FSDP2's own forward hooks (they unshard / reshard the module's parameters): the fused path
    runs them itself (sharded_head="gather") or bypasses the module on purpose ("vocab_parallel")."""
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp.")


def is_zero3_param(param) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``param`` (``deepspeed.zero.Init`` or a stage-3 engine
    gives each such parameter its ``ds_id`` / ``ds_status``; outside the owning module's forward its
    data is an empty partition)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _is_zero3_hook(hook) -> bool:
    """DeepSpeed ZeRO-3's module hooks (all-gather before the module's forward and backward,
    release after, reduce-scatter the gradients): the fused path runs them itself (the lm_head's own
    forward is replaced, the module is still called). Its post-forward hook comes wrapped by
    ``deepspeed.utils.nvtx.instrument_w_nvtx`` (no ``functools.wraps``): the hook is then the
    function in the wrapper's closure."""
    candidates = [hook, getattr(hook, "__wrapped__", None)]
    candidates += [cell.cell_contents for cell in (getattr(hook, "__closure__", None) or ())
                   if callable(getattr(cell, "cell_contents", None))]
    return any(getattr(fn, "__module__", "").startswith("deepspeed.runtime.zero.") for fn in candidates if fn)


def _zero3_gathered(param) -> bool:
    """Whether a ZeRO-3 parameter holds its whole data now (inside its module's forward/backward)."""
    return getattr(getattr(param, "ds_status", None), "name", "") == "AVAILABLE"


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
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
    fsdp_module = _fsdp_module_class()
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


def _fsdp_manages(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether FSDP2 manages the lm_head weight: a DTensor now, or a module on the way from the
    model down to the lm_head (the lm_head included) is an FSDP2 module, whose group holds the
    weight (unsharded between a forward and its backward, or after a forward without gradient)."""
    if _is_dtensor(head.weight):
        return True
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return False
    if isinstance(model, fsdp_module) or isinstance(head, fsdp_module):
        return True
    if not any(isinstance(module, fsdp_module) for module in model.modules()):
        return False
    if any(isinstance(parent, fsdp_module) for parent, _ in _module_path(model, head)):
        return True
    return fsdp_head_param(model, head.weight) is not None


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


def fused_head_or_reason(model, *, sharded: bool = False, zero3: bool = False) -> tuple[FusedHead | None, str]:
    """``(FusedHead, "")`` when the fused path computes exactly the model's logits, else
    ``(None, reason)``.

    ``sharded``: whether the caller handles an lm_head that FSDP2 manages (``FusedHead.sharded``:
    through :func:`sharded_token_logprobs`, never the decoder alone). A caller that does not (the
    default) gets ``(None, reason)`` for such a model and computes the model's own logits.
    ``zero3``: whether the caller handles an lm_head that DeepSpeed ZeRO-3 partitions (through
    :func:`sharded_token_logprobs`, "gather"); without it ZeRO-3's module hooks count as hooks the
    fused path would skip, as before."""
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
    # fully_shard(lm_head) makes it an FSDPLinear: still a plain Linear underneath.
    if head is None or _unwrapped_class(head) is not torch.nn.Linear:
        kind = "missing" if head is None else f"a {type(head).__module__}.{type(head).__qualname__}"
        return None, (f"lm_head is {kind}, not a plain torch.nn.Linear (adapted by LoRA, wrapped by "
                      "peft modules_to_save / trainable_token_indices, or quantised)")
    zero3_head = zero3 and is_zero3_param(head.weight)
    hooks = [hook for hook in (*head._forward_hooks.values(), *head._forward_pre_hooks.values())
             if not _is_fsdp_hook(hook) and not (zero3_head and _is_zero3_hook(hook))]
    if hooks:
        return None, "lm_head has forward hooks (e.g. accelerate offloading) the fused path would skip"
    if not head.weight.dtype.is_floating_point:
        return None, f"lm_head.weight has dtype {head.weight.dtype}"
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module):
        return None, "the base (decoder) model could not be found"
    if zero3_head:
        if not any(_is_zero3_hook(hook) for hook in head._forward_pre_hooks.values()):
            # Partitioned by deepspeed.zero.Init but not (yet) under an engine: nothing would
            # all-gather the weight for the lm_head's forward.
            return None, ("DeepSpeed ZeRO-3 partitions the lm_head weight but no ZeRO-3 engine hooks the lm_head "
                          "module (wrap the model with deepspeed.initialize / accelerate first)")
        return FusedHead(decoder, head.weight, head.bias, module=head, sharded=True, manager="zero3"), ""
    managed = _fsdp_manages(model, head)
    if managed and not sharded:
        return None, ("FSDP2 manages the lm_head (its root forward must run to all-gather the embeddings and "
                      "final norm); pyalign.models.fused_head's causal_lm_sequence_logprobs and "
                      "causal_lm_preference_loss handle it (sharded_head)")
    return FusedHead(decoder, head.weight, head.bias, module=head, sharded=managed,
                     manager="fsdp2" if managed else ""), ""


def _resolve(model, fused) -> FusedHead | None:
    """The FusedHead to use, None for the logits path; ``fused=True`` raises when unsupported."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused: expected one of {FUSED_CHOICES}, got {fused!r}")
    if fused is False:
        return None
    head, reason = fused_head_or_reason(model, sharded=True)
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
    return _operands(hidden, head.weight, head.bias)


def _operands(hidden: Tensor, weight, bias, param_dtype: torch.dtype | None = None):
    """``(hidden, weight, bias)`` cast to the compute dtype: autocast's, else ``param_dtype`` (the
    dtype FSDP2's MixedPrecisionPolicy all-gathers a sharded weight in), else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = param_dtype or weight.dtype
    bias = None if bias is None else bias.to(dtype)
    return hidden.to(dtype), weight.to(dtype), bias


# --------------------------------------------------------------------------- FSDP2: the sharded lm_head


def _vocab_parallel_capable(info: FsdpHeadParam | None) -> bool:
    """Whether the weight's FSDP2 layout is the vocabulary split the vocabulary-parallel op takes:
    ``Shard(0)`` on a 1-D mesh (not HSDP's replicated 2-D mesh, not a custom shard placement)."""
    if info is None:
        return False
    from torch.distributed.tensor import Shard  # noqa: PLC0415

    placements = tuple(info.sharded.placements)
    return (info.sharded.device_mesh.ndim == 1 and len(placements) == 1
            and type(placements[0]) is Shard and placements[0].dim == 0)


class _LogprobHead(torch.nn.Module):
    """Stands in for the lm_head during one call (sharded_head="vocab_parallel"): returns token
    log-probs instead of logits, without calling the lm_head module, so that FSDP's hooks on the
    lm_head do not all-gather its weight. The lm_head stays registered as a child, so that FSDP's
    first-forward scan of the model (which finds every FSDP module) still sees it."""

    def __init__(self, head: torch.nn.Module, compute):
        super().__init__()
        self.head = head
        self._compute = compute

    def forward(self, hidden: Tensor) -> Tensor:
        return self._compute(hidden)


class _HeadSwap:
    """Context manager: for one model call, the lm_head computes token log-probs.

    ``gather``: the lm_head module's own ``forward`` is shadowed (an instance attribute), so that
    calling it still runs FSDP's pre-forward (all-gather), post-forward (reshard) and post-backward
    (reduce-scatter) hooks. ``vocab_parallel``: the parent's child is replaced by a
    :class:`_LogprobHead`."""

    def __init__(self, parent: torch.nn.Module, name: str, head: torch.nn.Module, strategy: str, compute):
        self.parent, self.name, self.head, self.strategy, self.compute = parent, name, head, strategy, compute

    def __enter__(self):
        if self.strategy == "gather":
            if "forward" in self.head.__dict__:
                raise ValueError("sharded_head: the lm_head's forward is already replaced on the instance "
                                 "(another wrapper); the fused path would hide it")
            self.head.forward = self.compute
        else:
            self.parent._modules[self.name] = _LogprobHead(self.head, self.compute)
        return self

    def __exit__(self, *exc):
        if self.strategy == "gather":
            del self.head.__dict__["forward"]
        else:
            self.parent._modules[self.name] = self.head
        return False


def sharded_token_logprobs(model, head: FusedHead, input_ids: Tensor, attention_mask: Tensor | None,
                           targets: Tensor, *, sharded_head: str = "auto", ignore_index: int = IGNORE_INDEX,
                           mode: str = "default", memory_budget: int | None = None,
                           grad_filter: float | None = None, backend: str = "auto",
                           model_kwargs: dict | None = None, return_stats: bool = False,
                           compute_dtype: torch.dtype | None = None,
                           forward=None) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Token log-probs ``[B, T]`` of ``targets`` (aligned with the hidden states, as from
    :func:`shift_labels`) for a model whose lm_head FSDP2 manages, through the model's own forward
    (so that FSDP's root hooks all-gather the embeddings and final norm) with the lm_head answering
    log-probs for this one call. ``sharded_head``: :data:`SHARDED_HEAD_CHOICES` (module docstring).
    Every process of the FSDP group must make the same call (FSDP's collectives require it anyway).

    ``return_stats``: also return the statistics of ``linear_token_logprobs(return_stats=True)``
    (``(logp, stats)``, without gradient); they need the whole weight, so "auto" then means "gather"
    and "vocab_parallel" is refused. ``compute_dtype`` ("gather" only): the dtype the lm_head computes
    in (None: as the model would, :func:`_operands`; the TRL drop-in passes float32 for
    ``cast_lm_head_to_fp32``).
    ``forward``: what runs the model's forward, called with ``input_ids``, ``attention_mask`` and
    ``model_kwargs`` (None: ``model`` itself, hooks included); a caller already inside the model's
    forward passes the model's own forward so that the root's hooks do not run twice. A head that
    DeepSpeed ZeRO-3 partitions (``head.manager == "zero3"``) is computed by "gather" only."""
    if sharded_head not in SHARDED_HEAD_CHOICES:
        raise ValueError(f"sharded_head: expected one of {SHARDED_HEAD_CHOICES}, got {sharded_head!r}")
    if not isinstance(return_stats, bool):
        raise ValueError(f"return_stats: expected True or False, got {return_stats!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype: expected None or a floating torch.dtype, got {compute_dtype!r}")
    zero3 = head.manager == "zero3"
    model_kwargs = dict(model_kwargs or {})
    if "labels" in model_kwargs:
        raise ValueError("model_kwargs: labels go to the fused path, not to the model (it would compute its own loss)")
    module = head.module
    path = _module_path(model, module)
    if module is None or not path:
        raise ValueError("model: its lm_head is not a submodule of the model passed (pass the FSDP root model)")
    parent, name = path[-1]
    info = None if zero3 else fsdp_head_param(model, module.weight)
    strategy = sharded_head
    if strategy == "vocab_parallel" and (zero3 or return_stats):
        why = ("DeepSpeed ZeRO-3 partitions the lm_head weight as a flat slice, not a vocabulary split" if zero3
               else "return_stats=True needs every logit of a row, which only the whole weight gives")
        raise ValueError(f"sharded_head: 'vocab_parallel' cannot run here: {why}; use sharded_head='gather' "
                         "(or 'auto')")
    if strategy == "auto":
        strategy = "gather" if zero3 or return_stats else DEFAULT_SHARDED_HEAD
        if strategy == "vocab_parallel" and not _vocab_parallel_capable(info):
            strategy = "gather"  # e.g. HSDP's 2-D mesh: only the whole weight is right there
    if strategy == "vocab_parallel" and compute_dtype is not None:
        raise ValueError("compute_dtype: only sharded_head='gather' takes it (the vocabulary-parallel op computes in "
                         "the dtype FSDP gathers in)")
    if strategy == "vocab_parallel" and not _vocab_parallel_capable(info):
        layout = "not managed by an FSDP2 module of this model" if info is None else (
            f"placements {tuple(info.sharded.placements)} on a {info.sharded.device_mesh.ndim}-D mesh")
        raise ValueError(f"sharded_head: 'vocab_parallel' needs the lm_head weight sharded along the vocabulary, "
                         f"Shard(0) on a 1-D mesh; it is {layout}. Use sharded_head='gather'")
    options = dict(ignore_index=ignore_index, mode=mode, memory_budget=memory_budget, grad_filter=grad_filter,
                   backend=backend)
    calls = []
    stats_out = {}

    def compute(hidden: Tensor) -> Tensor:
        calls.append(hidden.shape)
        logp = _head_logprobs(hidden)
        # A fresh tensor, not a view: FSDP hooks the root's outputs for its pre-backward
        # all-gather, and warns (rightly) that an in-place op on a returned view would drop that.
        return logp.clone() if logp._base is not None else logp

    def _head_logprobs(hidden: Tensor) -> Tensor:
        weight, bias = module.weight, module.bias
        if strategy == "gather":
            if _is_dtensor(weight):
                raise ValueError(
                    "sharded_head: 'gather' found the lm_head weight still sharded inside the lm_head's forward: "
                    "no FSDP2 module all-gathers it there (e.g. a tied weight whose FSDP module resharded after "
                    "its own forward); use sharded_head='vocab_parallel'")
            if zero3 and not _zero3_gathered(weight):
                raise ValueError(
                    "sharded_head: 'gather' found the lm_head weight still partitioned by DeepSpeed ZeRO-3 inside the "
                    f"lm_head's forward (ds_status {getattr(weight, 'ds_status', None)}): ZeRO-3's module hooks did "
                    "not gather it (is the model under a ZeRO-3 engine?)")
            if compute_dtype is not None:
                hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
                bias_c = None if bias is None else bias.to(compute_dtype)
            else:
                hidden_c, weight_c, bias_c = _operands(hidden, weight, bias)
            if return_stats:
                # Without gradient, from the same chunks of logits as the log-probs; they leave
                # through this closure, not through the model's output.
                logp, stats = linear_token_logprobs(hidden_c, weight_c, targets, bias=bias_c, return_stats=True,
                                                    **options)
                stats_out.update(stats)
                return logp
            return linear_token_logprobs(hidden_c, weight_c, targets, bias=bias_c, **options)
        # A weight that stayed sharded is in FSDP's storage dtype: compute in the dtype FSDP would
        # have all-gathered it in (mixed precision), like the gathered paths do.
        hidden_c, weight_c, bias_c = _operands(hidden, weight, bias,
                                               info.param_dtype if _is_dtensor(weight) else None)
        if _is_dtensor(weight):
            # The weight stayed sharded (the lm_head is its own FSDP group, never called): the op
            # writes this process's rows of the gradient, summed over every process's tokens,
            # into the DTensor's .grad; FSDP's reduce-scatter would also have divided that sum.
            return vocab_parallel_token_logprobs(hidden_c, weight_c, targets, bias=bias_c,
                                                 weight_grad_scale=1.0 / info.divide_factor, **options)
        if sharded_head == "auto":
            # FSDP has all-gathered the whole weight already (for the root's or the embedding's
            # group): splitting it would only add communication.
            return linear_token_logprobs(hidden_c, weight_c, targets, bias=bias_c, **options)
        # Explicit vocab_parallel on an all-gathered weight: this process's rows of it; the rest of
        # the unsharded gradient stays zero, and FSDP's reduce-scatter sums (and divides) as usual.
        mesh = info.sharded.device_mesh
        group = mesh.get_group()
        start, end = shard_range(weight_c.shape[0], torch.distributed.get_rank(group),
                                 torch.distributed.get_world_size(group))
        return vocab_parallel_token_logprobs(
            hidden_c, weight_c[start:end], targets, bias=None if bias_c is None else bias_c[start:end],
            vocab_start=start, vocab_size=weight_c.shape[0], group=group, **options)

    model_kwargs.setdefault("use_cache", False)
    call = model if forward is None else forward
    with _HeadSwap(parent, name, module, strategy, compute):
        outputs = call(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    logp = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if len(calls) != 1 or tuple(logp.shape) != tuple(targets.shape) or not logp.dtype.is_floating_point:
        raise RuntimeError(
            f"pyalign: the model's forward called its lm_head {len(calls)} time(s) and returned logits of shape "
            f"{tuple(logp.shape)}; the sharded fused path expects one call on the hidden states [B, T, H] "
            f"and token log-probs {tuple(targets.shape)} back (model types in FUSED_MODEL_TYPES do this)")
    if logp.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"model: its forward cast the log-probs to {logp.dtype} (FSDP2's MixedPrecisionPolicy "
                         "output_dtype?); the sharded fused path needs them as computed (float32)")
    return (logp, stats_out) if return_stats else logp


def causal_lm_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                            *, head: FusedHead | None = None, **model_kwargs) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm) of a supported causal LM."""
    if head is None:
        head = _resolve(model, True)
    if head.sharded:
        raise ValueError("model: FSDP2 manages its lm_head, so its root forward (which all-gathers the embeddings "
                         "and final norm) must run: use causal_lm_sequence_logprobs / causal_lm_preference_loss, "
                         "which go through it")
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
    sharded_head: str = "auto",
    **model_kwargs,
) -> Tensor:
    """Sequence log-probs ``[B]`` (float32) of ``labels`` under ``model``; ``average=True``: mean
    over scored tokens. Drop-in for ``sequence_logprobs(model(...).logits[:, :-1], labels[:, 1:])``.

    ``fused``: ``"auto"`` (fused lm_head when the model allows it, else the logits with a logged
    reason), ``True`` (fused or ValueError), ``False`` (logits). ``mode``: of
    :func:`pyalign.linear_token_logprobs`. ``sharded_head``: how an FSDP2-sharded lm_head is
    handled (:data:`SHARDED_HEAD_CHOICES`, module docstring); unused otherwise.
    """
    if sharded_head not in SHARDED_HEAD_CHOICES:
        raise ValueError(f"sharded_head: expected one of {SHARDED_HEAD_CHOICES}, got {sharded_head!r}")
    head = _resolve(model, fused)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **model_kwargs).logits
        return sequence_logprobs(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index,
                                 average=average, backend=backend)
    targets = shift_labels(labels, ignore_index)
    if head.sharded:
        token_logps = sharded_token_logprobs(model, head, input_ids, attention_mask, targets,
                                             sharded_head=sharded_head, ignore_index=ignore_index, mode=mode,
                                             backend=backend, model_kwargs=model_kwargs)
    else:
        hidden = causal_lm_hidden_states(model, input_ids, attention_mask, head=head, **model_kwargs)
        hidden, weight, bias = _compute_operands(hidden, head)
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
    sharded_head: str = "auto",
    **loss_kwargs,
) -> LossOutput:
    """A preference loss on a batch of ``2B`` rows (chosen rows first, then rejected).

    ``loss``: a :class:`pyalign.PreferenceLoss`, or a loss name with its options in
    ``loss_kwargs`` (``beta=...``, ...). ``fused``: as for :func:`causal_lm_sequence_logprobs`;
    ``mode``, ``memory_budget``, ``grad_filter``: of the fused-linear preference loss.
    ``sharded_head``: as for :func:`causal_lm_sequence_logprobs` (an FSDP2-sharded lm_head: the
    token log-probs come from the sharded path and the loss from their sums, so the loss-aware
    6*N*H*V backward of the fused-linear loss does not apply there).
    """
    if sharded_head not in SHARDED_HEAD_CHOICES:
        raise ValueError(f"sharded_head: expected one of {SHARDED_HEAD_CHOICES}, got {sharded_head!r}")
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
    if head.sharded:
        targets = shift_labels(labels, loss.ignore_index)
        token_logps = sharded_token_logprobs(
            model, head, input_ids, attention_mask, targets, sharded_head=sharded_head,
            ignore_index=loss.ignore_index, mode=mode, memory_budget=memory_budget, grad_filter=grad_filter,
            backend=loss.backend, model_kwargs=model_kwargs)
        num_tokens = (targets != loss.ignore_index).sum(-1)
        policy_logps = token_logps.sum(-1)
        if loss.average:
            policy_logps = policy_logps / num_tokens.clamp(min=1).to(policy_logps.dtype)
        return loss.loss_from_sequence_logprobs(policy_logps, ref_logps, chain_logps, num_tokens)
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
