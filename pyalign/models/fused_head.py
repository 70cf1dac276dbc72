"""transformers causal LMs through the fused lm_head: no ``[B, T, V]`` logits tensor.

A causal LM computes ``logits = transform(lm_head(decoder(...).last_hidden_state))``. Here the
decoder (the base model, final norm included) runs alone, and its hidden states go with the
lm_head weight to :func:`pyalign.linear_token_logprobs` / the fused-linear ``PreferenceLoss``, the
transform (a logit scale and/or soft-cap: Gemma 2/3, Cohere, Granite, ...) applied chunk by chunk.

Which models: decided from the model itself, not from a list
(:func:`pyalign.models.head_eligibility.fused_head_or_reason`: the lm_head's structure, then one
check of the model's own forward on a few tokens, cached per model; docs/models.md has the table
for every causal-LM family of the installed transformers). Works with peft LoRA in the decoder (the
PeftModel wrapper is unwrapped) and on the lm_head itself (the effective weight ``W + scaling B A``;
autograd carries the gradient to A and B), ``modules_to_save`` (the copy in use),
``trainable_token_indices``, tied embeddings (autograd sums both uses), gradient checkpointing and
autocast (hidden states and weight cast to the autocast dtype, as ``F.linear`` under autocast
would). Falls back to the model's own logits, with the reason logged once, when the fused path
would not compute the same thing: another head (quantised, hooked, an unknown adapter), a forward
that does something else than a scale or soft-cap after the lm_head, a prompt-learning adapter.
MoE router auxiliary losses are not added (the model adds them only with ``labels``).

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

The sharded path returns the log-probs through the model's forward, so it takes models whose
forward returns the lm_head's output unchanged (no scale or soft-cap), and checks at every call
that it did. ``sharded_token_logprobs(..., return_stats=True)`` also returns the statistics of
``linear_token_logprobs(return_stats=True)`` (entropy, mean logit, ..., what TRL's DPOTrainer logs):
they need every logit of a row, so they are computed where the whole weight is, inside the lm_head's
forward ("gather"). A caller that is itself inside the model's forward (the TRL drop-in,
:mod:`pyalign.integrations.trl.fused_head`: the root's FSDP hooks have run) passes ``forward=`` the
model's own forward, so the root's hooks are not run a second time.

DeepSpeed ZeRO-3 works the same way for a caller that asks for it (``fused_head_or_reason(...,
zero3=True)``, the TRL drop-in): ZeRO-3's module hooks gather the lm_head's whole weight for the
fused op computed in place of its ``forward``, and partition its gradient as ``F.linear``'s would be
("gather"; the weight is never a DTensor, so "vocab_parallel" does not apply).

Labels follow the transformers convention: ``labels`` ``[B, T]`` are token ids aligned with
``input_ids`` (``ignore_index`` where not scored); position t's hidden state predicts
``labels[:, t + 1]``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from pyalign.losses.pairwise import LossOutput
from pyalign.losses.preference_loss import PreferenceLoss
from pyalign.models.head_eligibility import (  # noqa: F401  (re-exported: the public names of the fused head)
    FusedHead, HeadTransform, fused_head_or_reason, op_takes_transform,
)
from pyalign.models.head_sharding import (  # noqa: F401  (re-exported)
    FsdpHeadParam, fsdp_head_param, is_dtensor, is_zero3_param, module_path, operands, unwrapped_class,
    vocab_parallel_capable, zero3_gathered,
)
from pyalign.ops.linear_token_logprobs import linear_token_logprobs
from pyalign.ops.token_logprobs import sequence_logprobs, token_logprobs
from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs
from pyalign.reference import IGNORE_INDEX

logger = logging.getLogger(__name__)

FUSED_CHOICES = ("auto", True, False)
SHARDED_HEAD_CHOICES = ("auto", "gather", "vocab_parallel")
# The strategy "auto" prefers for an FSDP2-sharded lm_head, the one `python -m bench.sharded_head`
# measured best (docs/fused_linear.md, "Sharded lm_head (FSDP2)"); "auto" still uses the whole
# weight where FSDP has gathered it anyway, and "gather" where vocab_parallel cannot apply.
DEFAULT_SHARDED_HEAD = "vocab_parallel"

_warned: set[str] = set()


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
    """Hidden states and lm_head parameters (formed now: a LoRA head's effective weight) in the
    dtype the model's lm_head would compute in."""
    weight, bias = head.params()
    return operands(hidden, weight, bias)


def head_token_logprobs(hidden: Tensor, head: FusedHead, targets: Tensor, **options):
    """``linear_token_logprobs`` of the decoder's hidden states through ``head``: its weight (formed
    now), bias and transform; ``options`` go to the op (``ignore_index``, ``mode``, ``return_stats``...)."""
    hidden, weight, bias = _compute_operands(hidden, head)
    return linear_token_logprobs(hidden, weight, targets, bias=bias, **head.transform.op_options(), **options)


# --------------------------------------------------------------------------- FSDP2: the sharded lm_head


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
                           compute_dtype: torch.dtype | None = None, forward=None,
                           transform: HeadTransform | None = None) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Token log-probs ``[B, T]`` of ``targets`` (aligned with the hidden states, as from
    :func:`shift_labels`) for a model whose lm_head FSDP2 manages, through the model's own forward
    (so that FSDP's root hooks all-gather the embeddings and final norm) with the lm_head answering
    log-probs for this one call. ``sharded_head``: :data:`SHARDED_HEAD_CHOICES` (module docstring).
    Every process of the FSDP group must make the same call (FSDP's collectives require it anyway).

    ``return_stats``: also return the statistics of ``linear_token_logprobs(return_stats=True)``
    (``(logp, stats)``, without gradient); they need the whole weight, so "auto" then means "gather"
    and "vocab_parallel" is refused. ``compute_dtype`` ("gather" only): the dtype the lm_head computes
    in (None: as the model would, :func:`operands`; the TRL drop-in passes float32 for
    ``cast_lm_head_to_fp32``).
    ``forward``: what runs the model's forward, called with ``input_ids``, ``attention_mask`` and
    ``model_kwargs`` (None: ``model`` itself, hooks included); a caller already inside the model's
    forward passes the model's own forward so that the root's hooks do not run twice. A head that
    DeepSpeed ZeRO-3 partitions (``head.manager == "zero3"``) is computed by "gather" only.
    ``transform``: a scale / soft-cap the caller applies to the logits (TRL's temperature); the
    model's own must be the identity here (``fused_head_or_reason`` refuses the sharded path
    otherwise), since the model's forward would apply it to the returned log-probs."""
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
    path = module_path(model, module)
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
        if strategy == "vocab_parallel" and not vocab_parallel_capable(info):
            strategy = "gather"  # e.g. HSDP's 2-D mesh: only the whole weight is right there
    if strategy == "vocab_parallel" and compute_dtype is not None:
        raise ValueError("compute_dtype: only sharded_head='gather' takes it (the vocabulary-parallel op computes in "
                         "the dtype FSDP gathers in)")
    if strategy == "vocab_parallel" and not vocab_parallel_capable(info):
        layout = "not managed by an FSDP2 module of this model" if info is None else (
            f"placements {tuple(info.sharded.placements)} on a {info.sharded.device_mesh.ndim}-D mesh")
        raise ValueError(f"sharded_head: 'vocab_parallel' needs the lm_head weight sharded along the vocabulary, "
                         f"Shard(0) on a 1-D mesh; it is {layout}. Use sharded_head='gather'")
    if not head.transform.identity:
        raise ValueError(f"head: the model's forward applies {head.transform} to the lm_head's output; the sharded "
                         "fused path returns the log-probs through that forward (fused_head_or_reason refuses it)")
    options = dict(ignore_index=ignore_index, mode=mode, memory_budget=memory_budget, grad_filter=grad_filter,
                   backend=backend, **(transform or HeadTransform()).op_options())
    calls, returned = [], []
    stats_out = {}

    def compute(hidden: Tensor) -> Tensor:
        calls.append(hidden.shape)
        logp = _head_logprobs(hidden)
        # A fresh tensor, not a view: FSDP hooks the root's outputs for its pre-backward
        # all-gather, and warns (rightly) that an in-place op on a returned view would drop that.
        logp = logp.clone() if logp._base is not None else logp
        returned.append(logp.detach())
        return logp

    def _head_logprobs(hidden: Tensor) -> Tensor:
        weight, bias = module.weight, module.bias
        if strategy == "gather":
            if is_dtensor(weight):
                raise ValueError(
                    "sharded_head: 'gather' found the lm_head weight still sharded inside the lm_head's forward: "
                    "no FSDP2 module all-gathers it there (e.g. a tied weight whose FSDP module resharded after "
                    "its own forward); use sharded_head='vocab_parallel'")
            if zero3 and not zero3_gathered(weight):
                raise ValueError(
                    "sharded_head: 'gather' found the lm_head weight still partitioned by DeepSpeed ZeRO-3 inside the "
                    f"lm_head's forward (ds_status {getattr(weight, 'ds_status', None)}): ZeRO-3's module hooks did "
                    "not gather it (is the model under a ZeRO-3 engine?)")
            if compute_dtype is not None:
                hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
                bias_c = None if bias is None else bias.to(compute_dtype)
            else:
                hidden_c, weight_c, bias_c = operands(hidden, weight, bias)
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
        hidden_c, weight_c, bias_c = operands(hidden, weight, bias,
                                               info.param_dtype if is_dtensor(weight) else None)
        if is_dtensor(weight):
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
            f"and token log-probs {tuple(targets.shape)} back (fused_head_or_reason checks this)")
    if logp.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"model: its forward cast the log-probs to {logp.dtype} (FSDP2's MixedPrecisionPolicy "
                         "output_dtype?); the sharded fused path needs them as computed (float32)")
    # The check of fused_head_or_reason, repeated at no cost on every call: the forward returned
    # the lm_head's output untouched (ZeRO-3 hands back a new tensor of the same values).
    if not torch.equal(logp.detach(), returned[0]):
        raise RuntimeError("pyalign: the model's forward changed the lm_head's output before returning it; the "
                           "sharded fused path needs it returned unchanged (use fused=False for this model)")
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


def _fused_token_logprobs(model, head: FusedHead, input_ids: Tensor, attention_mask: Tensor | None,
                          targets: Tensor, *, sharded_head: str, model_kwargs: dict, **options) -> Tensor:
    """Token log-probs ``[B, T]`` of ``targets`` (:func:`shift_labels`) through the fused head."""
    if head.sharded:
        return sharded_token_logprobs(model, head, input_ids, attention_mask, targets, sharded_head=sharded_head,
                                      model_kwargs=model_kwargs, **options)
    hidden = causal_lm_hidden_states(model, input_ids, attention_mask, head=head, **model_kwargs)
    return head_token_logprobs(hidden, head, targets, **options)


def causal_lm_token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    fused: bool | str = "auto",
    mode: str = "default",
    backend: str = "auto",
    sharded_head: str = "auto",
    **model_kwargs,
) -> Tensor:
    """Token log-probs ``[B, T-1]`` (float32, 0 where ignored) of ``labels[:, 1:]`` under ``model``.
    Drop-in for ``token_logprobs(model(...).logits[:, :-1], labels[:, 1:])``; the options are those
    of :func:`causal_lm_sequence_logprobs`."""
    if sharded_head not in SHARDED_HEAD_CHOICES:
        raise ValueError(f"sharded_head: expected one of {SHARDED_HEAD_CHOICES}, got {sharded_head!r}")
    head = _resolve(model, fused)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **model_kwargs).logits
        return token_logprobs(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index, backend=backend)
    targets = shift_labels(labels, ignore_index)
    return _fused_token_logprobs(model, head, input_ids, attention_mask, targets, sharded_head=sharded_head,
                                 model_kwargs=model_kwargs, ignore_index=ignore_index, mode=mode,
                                 backend=backend)[:, :-1]


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
    token_logps = _fused_token_logprobs(model, head, input_ids, attention_mask, targets, sharded_head=sharded_head,
                                        model_kwargs=model_kwargs, ignore_index=ignore_index, mode=mode,
                                        backend=backend)
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
    ``sharded_head``: as for :func:`causal_lm_sequence_logprobs`. An FSDP2-sharded lm_head, or a
    model that scales or soft-caps its logits: the token log-probs come from the fused op and the
    loss from their sums, so the loss-aware 6*N*H*V backward of the fused-linear loss (which takes
    plain logits) does not apply there.
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
    targets = shift_labels(labels, loss.ignore_index)
    if head.sharded or not head.transform.identity:
        token_logps = _fused_token_logprobs(
            model, head, input_ids, attention_mask, targets, sharded_head=sharded_head, model_kwargs=model_kwargs,
            ignore_index=loss.ignore_index, mode=mode, memory_budget=memory_budget, grad_filter=grad_filter,
            backend=loss.backend)
        num_tokens = (targets != loss.ignore_index).sum(-1)
        policy_logps = token_logps.sum(-1)
        if loss.average:
            policy_logps = policy_logps / num_tokens.clamp(min=1).to(policy_logps.dtype)
        return loss.loss_from_sequence_logprobs(policy_logps, ref_logps, chain_logps, num_tokens)
    hidden = causal_lm_hidden_states(model, input_ids, attention_mask, head=head, **model_kwargs)
    hidden, weight, bias = _compute_operands(hidden, head)
    return loss(labels=targets, ref_logps=ref_logps, chain_logps=chain_logps, hidden=hidden, weight=weight,
                bias=bias, mode=mode, memory_budget=memory_budget, grad_filter=grad_filter)


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
