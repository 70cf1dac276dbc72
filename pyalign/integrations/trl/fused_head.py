"""pyalign's per-token log-probs behind TRL's fused-lm_head forward (docs/integrations.md).

TRL 1.16's DPOTrainer calls ``add_fused_lm_head(model, outputs=...)`` on the policy (and on the
reference model); that replaces ``model.forward`` so that ``model(..., labels=labels,
fused_lm_head=True)`` returns a :class:`trl.trainer.utils.FusedCausalLMOutput`: per-token
``log_probs [B, T-1]`` of ``labels[:, 1:]`` (0 where the label is -100) plus, on request,
``entropy``, ``mean_logits``, ``is_top1`` (TRL's metrics) and ``log_sum_sq_probs`` (WPO weights).
Every log-prob TRL's DPOTrainer reads (policy, reference, precomputed reference) comes from that
call.

:func:`add_fused_lm_head` here installs TRL's forward first, then wraps it: a ``fused_lm_head=True``
call is answered by pyalign and returns the same ``FusedCausalLMOutput``:

- **fused lm_head** (:func:`pyalign.linear_token_logprobs`) when
  :func:`pyalign.models.fused_head.fused_head_or_reason` shows (from the model itself, checked once)
  that the model's logits are ``transform(lm_head(last hidden state))``, the transform a scale and/or
  soft-cap (Gemma 2/3, Cohere, Granite, ...): only completion tokens are projected, the transform
  is applied chunk by chunk; the statistics (``return_stats=True``) come from the same chunks of
  transformed logits, without gradient. A LoRA-adapted lm_head is fused through its effective weight,
  ``modules_to_save`` through the copy in use. The head computes in the model's dtype (autocast
  included), or in float32 on a CPU without native bf16/fp16 matmul (:func:`cpu_half_matmul_is_slow`);
- **fused lm_head inside the lm_head's forward** when FSDP2 or DeepSpeed ZeRO-3 shards the lm_head
  (routes :data:`ROUTE_FSDP2`, :data:`ROUTE_ZERO3`): the model's own forward runs (this forward is
  already inside the model's call, so the root's FSDP / ZeRO-3 hooks have run) with the lm_head's
  ``forward`` answering token log-probs and statistics for that call
  (:func:`pyalign.models.fused_head.sharded_token_logprobs`, "gather"): the lm_head module is still
  called, so FSDP2's or ZeRO-3's own hooks gather its whole weight for it, gather it again for the
  backward and reduce-scatter its gradient, exactly as for the logits. The statistics need every
  logit of a row, which is why the weight is gathered rather than split by vocabulary;
- else the **fused op on the model's own logits** (:func:`pyalign.token_logprobs`): the model
  computes its logits (whatever its forward does after the lm_head) and the statistics are
  computed from them without gradient;
- **handed back to TRL's own forward**, with the reason logged once, for what pyalign does not
  compute: an lm_head sharded by FSDP1 (``fsdp_version: 1``) or split by tensor parallelism (a
  DTensor no FSDP2 module of the model manages), router logits (MoE auxiliary loss) with a sharded
  lm_head or a model whose ``aux_loss`` is not its module's ``load_balancing_loss_func`` of the
  decoder's router logits (:mod:`pyalign.models.router_aux`, checked on the model once).
  ``strict=True`` raises ValueError instead. Elsewhere router logits are answered: the fused route
  computes the model's own load-balancing loss from the decoder's router logits, the logits route
  takes the model's ``aux_loss``; both add ``router_aux_loss_coef`` times it to ``loss``, as TRL does.

TRL's ``temperature`` is a logit scale (its ``softcap(scale * x) / T`` is the op's transform with
scale and cap both divided by ``T``, :func:`tempered`), and pre-shifted ``shift_labels`` (context
parallelism) are labels aligned with the hidden states: both are answered on every route.

``entropy`` is returned without gradient (TRL's DPOTrainer only logs it), like the other statistics.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyalign.data import IGNORE_INDEX
from pyalign.models import fused_head as hf
from pyalign.models.router_aux import router_aux_loss_or_reason
from pyalign.ops.token_logprobs import token_logprobs
from pyalign.reference import reference_token_stats

logger = logging.getLogger(__name__)

# Per-token fields of FusedCausalLMOutput besides log_probs; pyalign computes all of them.
STAT_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# The routes HeadSettings.routes records (docs/integrations.md, "What pyalign computes").
ROUTE_FUSED = "fused lm_head"
ROUTE_FSDP2 = "fused lm_head (FSDP2 gather)"
ROUTE_ZERO3 = "fused lm_head (ZeRO-3 gather)"
ROUTE_LOGITS = "logits"
ROUTE_TRL = "trl"


@dataclass
class HeadSettings:
    """Shared by every forward one trainer installs (policy, reference)."""

    fused: bool | str = "auto"   # as in pyalign.models.fused_head: "auto", True, False
    strict: bool = False         # raise instead of handing a forward back to TRL
    trainer: weakref.ref | None = None
    recording: list | None = None  # fused outputs of the current loss computation, in call order
    routes: list = field(default_factory=list)  # (model name, route, reason) of every fused call, last 64
    _logged: set = field(default_factory=set)

    def note(self, model, route: str, reason: str = "") -> None:
        # The model's own class: fully_shard swaps it for an FSDP<Class> subclass.
        self.routes.append((hf.unwrapped_class(model).__name__, route, reason))
        del self.routes[:-64]
        if reason and (route, reason) not in self._logged:
            self._logged.add((route, reason))
            what = {"trl": "TRL's own fused lm_head", "logits": "the model's full logits"}.get(route, route)
            logger.warning("pyalign.integrations.trl: %s for %s: %s", what, hf.unwrapped_class(model).__name__,
                           reason)


def _fsdp1_modules(model) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``, flat parameters) wraps modules of ``model``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: PLC0415
    except ImportError:
        return False
    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def _sharding_reason(settings: HeadSettings, model, weight) -> str:
    """Why a sharded lm_head must go to TRL ("" for the shardings pyalign computes: FSDP2, ZeRO-3)."""
    trainer = settings.trainer() if settings.trainer is not None else None
    accelerator = getattr(trainer, "accelerator", None)
    if (trainer is not None and getattr(trainer, "is_fsdp_enabled", False)
            and not getattr(accelerator, "is_fsdp2", False)) or _fsdp1_modules(model):
        # FSDP1 keeps the lm_head in flat parameters whose unsharded views only exist inside the
        # FSDP1 unit's forward; pyalign's route through the lm_head's own forward is built and tested
        # on FSDP2's per-parameter DTensors and hooks.
        return ("FSDP shards the lm_head with FSDP1 (fsdp_version: 1, flat parameters); pyalign's fused head "
                "handles FSDP2 (fsdp_version: 2)")
    parallelism = getattr(accelerator, "parallelism_config", None)
    tp_size = getattr(parallelism, "tp_size", None) or 1
    if tp_size > 1:
        return (f"tensor parallelism (parallelism_config tp_size={tp_size}) splits the lm_head; pyalign's fused "
                "head needs the whole weight inside the lm_head's forward")
    if hf.is_dtensor(weight) and hf.fsdp_head_param(model, weight) is None:
        # Inside the model's call FSDP2 has either unsharded the weight (root or tail group) or
        # will unshard it in the lm_head's forward (its own group, found here): a DTensor that no
        # FSDP2 group of the model owns is someone else's sharding.
        return ("the lm_head weight is a DTensor that no FSDP2 module of this model manages (tensor "
                "parallelism?); pyalign's fused head needs the whole weight inside the lm_head's forward")
    return ""


def handback_reason(settings: HeadSettings, model, *, temperature: float, outputs: tuple[str, ...],
                    shift_labels, model_kwargs: dict) -> str:
    """Why this fused call must go to TRL's own forward ("" when pyalign can answer it).
    ``temperature``, pre-shifted ``shift_labels`` (a logit scale; labels aligned with the hidden
    states) and router logits (:mod:`pyalign.models.router_aux`, decided with the head) are
    answered, so they are not reasons here; the arguments stay for callers."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _sharding_reason(settings, model, getattr(head, "weight", None))


def tempered(transform: hf.HeadTransform, temperature: float) -> hf.HeadTransform:
    """TRL's ``softcap(scale * logits) / temperature`` in the op's form: ``c tanh(s x / c) / T`` is
    ``(c / T) tanh((s / T) x / (c / T))``, so both the scale and the cap divide by ``T``."""
    if temperature == 1.0:
        return transform
    return hf.HeadTransform(transform.scale / temperature,
                            None if transform.softcap is None else transform.softcap / temperature)


# --------------------------------------------------------------------------- the two pyalign routes


@torch.no_grad()
def logits_token_stats(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                       chunk_bytes: int = 64 << 20, logit_scale: float = 1.0) -> dict[str, Tensor]:
    """The statistics of ``return_stats=True`` (:func:`pyalign.reference.reference_token_stats`)
    from materialised ``logits [..., V]`` (times ``logit_scale``: TRL's temperature), without
    gradient, over the scored positions only and in chunks of rows (at most ``chunk_bytes`` of
    float64 logits each), so that no second full-size tensor exists; float32 / bool, 0 / False where
    the label is ignored."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != ignore_index).nonzero().squeeze(1)
    out = {name: torch.zeros(flat_labels.shape, dtype=torch.float32, device=logits.device)
           for name in STAT_FIELDS if name != "is_top1"}
    out["is_top1"] = torch.zeros(flat_labels.shape, dtype=torch.bool, device=logits.device)
    rows_per_chunk = max(1, chunk_bytes // (8 * max(1, logits.shape[-1])))
    for start in range(0, keep.numel(), rows_per_chunk):
        rows = keep[start:start + rows_per_chunk]
        stats = reference_token_stats(flat.index_select(0, rows), flat_labels.index_select(0, rows), ignore_index,
                                      logit_scale=logit_scale)
        for name, value in out.items():
            value[rows] = stats[name].to(value.dtype)
    return {name: value.view(labels.shape) for name, value in out.items()}


def cpu_half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Whether CPU matrix products in ``dtype`` lack a native kernel here: without oneDNN's
    bf16/fp16 support (AVX2-only CPUs) ATen falls back to a generic loop, measured 8x
    (``hidden @ weight.T``) to 450x (``d_logits @ weight``) slower than float32 at SmolLM2's lm_head
    sizes (``ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.trl --head-profile``, docs/integrations.md)."""
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def head_operands(hidden: Tensor, head: hf.FusedHead, cast_lm_head_to_fp32: bool):
    """``(hidden, weight, bias, reason)`` in the dtype the lm_head computes in: the model's (autocast
    included, :mod:`pyalign.models.fused_head`), or float32 when asked (TRL's ``cast_lm_head_to_fp32``)
    or when this CPU has no native half-precision matmul (``reason`` says so)."""
    model_hidden = hidden
    model_weight, model_bias = head.params()  # formed once: a LoRA head's effective weight
    hidden, weight, bias = hf.operands(hidden, model_weight, model_bias)
    reason = ""
    if hidden.device.type == "cpu" and cpu_half_matmul_is_slow(hidden.dtype):
        reason = f"this CPU has no native {hidden.dtype} matmul (oneDNN), so the lm_head runs in float32"
    if (cast_lm_head_to_fp32 or reason) and hidden.dtype != torch.float32:
        bias = None if model_bias is None else model_bias.float()
        hidden, weight = model_hidden.float(), model_weight.float()
    return hidden, weight, bias, reason


def _fused_lm_head_logprobs(head: hf.FusedHead, args, kwargs, targets: Tensor, want_stats: bool,
                            cast_lm_head_to_fp32: bool, temperature: float, settings: HeadSettings, model,
                            router_aux=None, aux_loss: list | None = None):
    """Per-token log-probs [B, T] of ``targets`` (aligned with the hidden states) and statistics,
    from the decoder's hidden states and the lm_head; with ``router_aux``, the router's
    load-balancing loss is appended to ``aux_loss``."""
    from pyalign.ops.linear_token_logprobs import linear_token_logprobs  # noqa: PLC0415

    outputs = head.decoder(*args, **kwargs)
    if aux_loss is not None:  # the model's own load-balancing loss, from the decoder's router logits
        aux_loss.append(router_aux(outputs.router_logits, kwargs.get("attention_mask")))
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = hidden.to(head.weight.device)
    targets = targets.to(head.weight.device)
    hidden, weight, bias, reason = head_operands(hidden, head, cast_lm_head_to_fp32)
    settings.note(model, ROUTE_FUSED, reason)
    # The model's scale / soft-cap and TRL's temperature, applied chunk by chunk; the statistics
    # are those of the transformed logits, as TRL's own head computes them.
    transform = tempered(head.transform, temperature).op_options()
    if want_stats:
        return linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX,
                                     return_stats=True, **transform)
    return linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, **transform), {}


def _sharded_lm_head_logprobs(head: hf.FusedHead, trl_forward, args, kwargs, targets: Tensor, want_stats: bool,
                              cast_lm_head_to_fp32: bool, temperature: float, settings: HeadSettings, model):
    """Per-token log-probs [B, T] (and statistics) of a model whose lm_head FSDP2 or ZeRO-3 shards:
    the model's own forward (``trl_forward`` without ``fused_lm_head``: no second pass through the
    root's hooks, which this call is already inside) with the lm_head module's forward computing
    the fused op on the weight its FSDP2 / ZeRO-3 hooks gathered."""
    call_kwargs = dict(kwargs)
    if args:  # TRL passes keywords; name positional inputs so that the glue can pass them on
        bound = inspect.signature(hf.unwrapped_class(model).forward).bind_partial(model, *args).arguments
        bound.pop(next(iter(bound)))  # self
        call_kwargs.update(bound)
    input_ids = call_kwargs.pop("input_ids", None)
    attention_mask = call_kwargs.pop("attention_mask", None)
    weight = head.module.weight
    targets = targets.to(weight.device)
    # The dtype the lm_head would compute in: autocast's, else the one FSDP2 gathers in (mixed
    # precision), else the weight's; float32 where TRL asks for it or this CPU lacks a native
    # half-precision matmul (as in head_operands).
    device_type = targets.device.type
    info = hf.fsdp_head_param(model, weight) if head.manager == "fsdp2" else None
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else (info.param_dtype if info is not None and info.param_dtype is not None else weight.dtype))
    reason = ""
    if device_type == "cpu" and cpu_half_matmul_is_slow(dtype):
        reason = f"this CPU has no native {dtype} matmul (oneDNN), so the lm_head runs in float32"
    compute_dtype = torch.float32 if (cast_lm_head_to_fp32 or reason) and dtype != torch.float32 else None
    settings.note(model, ROUTE_ZERO3 if head.manager == "zero3" else ROUTE_FSDP2, reason)
    result = hf.sharded_token_logprobs(
        model, head, input_ids, attention_mask, targets, sharded_head="gather", ignore_index=IGNORE_INDEX,
        model_kwargs=call_kwargs, return_stats=want_stats, compute_dtype=compute_dtype, forward=trl_forward,
        transform=tempered(hf.HeadTransform(), temperature))
    return result if want_stats else (result, {})


def _logits_logprobs(trl_forward, args, kwargs, targets: Tensor, want_stats: bool, temperature: float,
                     aux_loss: list | None = None):
    """Per-token log-probs [B, T] (and statistics) from the model's own logits (divided by TRL's
    temperature); the model's own ``aux_loss`` is appended to ``aux_loss`` when router logits
    were requested."""
    outputs = trl_forward(*args, **kwargs)
    if aux_loss is not None:
        aux_loss.append(outputs.aux_loss)
    logits = outputs.logits
    targets = targets.to(logits.device)
    logp = token_logprobs(logits, targets, ignore_index=IGNORE_INDEX, logit_scale=1.0 / temperature)
    return logp, (logits_token_stats(logits, targets, logit_scale=1.0 / temperature) if want_stats else {})


# --------------------------------------------------------------------------- installation


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, trl_add_fused_lm_head,
                      settings: HeadSettings) -> None:
    """TRL's ``add_fused_lm_head`` (same arguments), answered by pyalign where it can be.

    TRL's forward is installed first and kept: it serves the non-fused calls (generation, plain
    logits) and every fused call handed back to TRL.
    """
    from trl.trainer.utils import FusedCausalLMOutput  # noqa: PLC0415

    trl_add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                          outputs=outputs)
    trl_forward = model.forward
    want_stats = any(name in outputs for name in STAT_FIELDS)
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        def hand_back(reason: str):
            if settings.strict:
                raise ValueError(f"strict: pyalign cannot compute this forward's log-probs: {reason}")
            settings.note(self, ROUTE_TRL, reason)
            result = trl_forward(*args, fused_lm_head=True, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
            if settings.recording is not None:
                settings.recording.append(result)
            return result

        reason = handback_reason(settings, self, temperature=temperature, outputs=outputs,
                                 shift_labels=shift_labels, model_kwargs=kwargs)
        if reason:
            return hand_back(reason)
        if labels is None and shift_labels is None:
            raise ValueError("labels: a fused_lm_head=True call needs labels ([B, T], -100 where not scored)")
        # Targets aligned with every hidden state: labels[:, 1:] (the last position not scored, then
        # dropped), or shift_labels as given (context parallelism: already shifted, every position).
        trim = shift_labels is None
        targets = hf.shift_labels(labels, IGNORE_INDEX) if trim else shift_labels
        if settings.fused is False:
            head, head_reason = None, "fused=False"
        else:
            # sharded / zero3: an lm_head that FSDP2 or ZeRO-3 shards is computed inside its own
            # forward (_sharded_lm_head_logprobs), never read directly.
            # forward: this call is already inside the model's; the one-time check of the model
            # runs its forward without the root's hooks (and without this wrapper).
            head, head_reason = hf.fused_head_or_reason(self, sharded=True, zero3=True, forward=trl_forward)
            if head is None and settings.fused is True:
                raise ValueError(f"fused: the fused lm_head path cannot run this model: {head_reason}")
        router = bool(kwargs.get("output_router_logits"))
        router_aux = None
        if router and head is not None:
            why = "router logits were requested (MoE auxiliary loss)"
            if head.sharded:
                return hand_back(f"{why} and the lm_head is sharded: pyalign's sharded route returns no aux_loss")
            router_aux, reason = router_aux_loss_or_reason(self, head.decoder, forward=trl_forward)
            if router_aux is None:
                return hand_back(f"{why}: {reason}")
        aux_loss = [] if router else None
        kwargs["use_cache"] = False
        if head is not None and head.sharded:
            log_probs, stats = _sharded_lm_head_logprobs(head, trl_forward, args, kwargs, targets, want_stats,
                                                         cast_lm_head_to_fp32, temperature, settings, self)
        elif head is not None:
            log_probs, stats = _fused_lm_head_logprobs(head, args, kwargs, targets, want_stats, cast_lm_head_to_fp32,
                                                       temperature, settings, self, router_aux, aux_loss)
        else:
            settings.note(self, ROUTE_LOGITS, head_reason if settings.fused == "auto" else "")
            log_probs, stats = _logits_logprobs(trl_forward, args, kwargs, targets, want_stats, temperature,
                                                aux_loss)
        if trim:
            # Fresh tensors, not views: FSDP2 hooks the root's outputs for its pre-backward
            # all-gather, and an in-place op on a returned view would drop that hook (FSDP warns).
            log_probs = log_probs[:, :-1].contiguous()
            stats = {name: value[:, :-1].contiguous() for name, value in stats.items()}
            targets = targets[:, :-1]
        mask = targets.to(log_probs.device) != IGNORE_INDEX
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        requested = {name: stats[name] for name in STAT_FIELDS if name in outputs}
        loss = -log_probs.sum() / denominator
        aux = aux_loss[0] if aux_loss else None
        if aux is not None:  # as TRL's own fused forward adds it
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux
        result = FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux, **requested)
        if settings.recording is not None:
            settings.recording.append(result)
        return result

    model.forward = types.MethodType(forward, model)
    model._pyalign_fused_head = settings
