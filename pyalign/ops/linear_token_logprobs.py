"""``linear_token_logprobs``: token log-probs of ``hidden @ weight.T (+ bias)`` without the logits.

The [N, V] logits are never materialised: tokens are processed in chunks whose logits
``[chunk, V]`` (input dtype) live in one reused buffer. Per chunk the fused op's backend kernels
(docs/DESIGN.md) compute the log-prob and the log-sum-exp, and the backward kernel overwrites the
same buffer with ``d_logits = g * (onehot - softmax)``, so there is never a second [chunk, V]
buffer. Tokens whose label is ``ignore_index`` are dropped before any matmul (prompt tokens cost
nothing).

Modes (flops for N kept tokens, H hidden, V vocabulary):

- ``"default"``: chunks of up to 256 MiB of logits. When only ``hidden`` needs a gradient (a frozen
  lm_head, e.g. LoRA), the forward also forms ``(onehot - softmax) @ weight`` per token and the
  backward only scales it by the upstream gradient: 4*N*H*V in all and no recompute. When the
  weight (or bias) needs a gradient the upstream gradient must be known before ``d_logits^T @ hidden``
  can be summed, so the backward recomputes the logits: 8*N*H*V. (The 6*N*H*V path, which needs
  the loss, lives in :mod:`pyalign.losses.linear_preference_loss`.)
- ``"low_memory"``: chunks of up to 32 MiB, nothing but the log-sum-exp per token saved; the
  backward recomputes the logits: 6*N*H*V (frozen weight) or 8*N*H*V.

The weight and bias gradients are formed vocabulary-major: per block of vocabulary columns, the
logits of all kept tokens are recomputed and that block of the gradient is written once (one
matmul over all tokens, one rounding), so no [V, H] float32 accumulator exists; ``grad_hidden``
is summed over blocks in a [N, H] float32 accumulator. ``grad_filter`` (off by default) skips the
gradient matmuls of vocabulary blocks whose every |d_logits| is below ``grad_filter * max|g|``:
approximate, with each dropped gradient element bounded by that limit (docs/fused_linear.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from pyalign.ops.backends import ENV_VAR, Backend, cuda_kind, resolve_backend
from pyalign.ops.linear_chunks import (  # noqa: F401  (re-exported: tests and linear_preference_loss)
    FILTER_BLOCK,
    MIB,
    STAT_NAMES,
    WeightGradSink,
    accumulate_product,
    chunk_stats_into,
    empty_stats,
    grad_hidden_from_runs,
    kept_vocab_runs,
    linear_into,
    rows_for_budget,
    vocab_block_columns,
    vocab_major_backward,
)
from pyalign.ops.token_logprobs import check_flag, check_ignore_index, labels_checked_on_host
from pyalign.reference import IGNORE_INDEX, output_dtype, validate_logit_transform

DEFAULT_BUDGETS = {"default": 256 * MIB, "low_memory": 32 * MIB}
MODES = tuple(DEFAULT_BUDGETS)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------- the op


@dataclass(frozen=True)
class LinearPlan:
    """How one call runs: the backend, the chunk size (rows of logits) and the options."""

    backend: Backend
    chunk: int
    ignore_index: int
    grad_filter: float | None
    precompute_grad_hidden: bool  # default mode with only hidden needing a gradient
    weight_grad_dtype: torch.dtype | None = None  # None: fp32 accumulation for half weights
    # The logit transform (pyalign.reference): z = logit_scale * logits, then softcap * tanh(z / softcap).
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def transform(self) -> tuple[float, float | None]:
        return self.logit_scale, self.softcap


def forward_pass(hidden2: Tensor, weight: Tensor, bias: Tensor | None, labels1: Tensor, plan: LinearPlan,
                 with_stats: bool = False):
    """Chunked forward over the kept tokens.

    Returns ``(logp [N], keep_idx [K], labels_kept [K], norm_kept [K, 2], unscaled_grad_hidden [K, H]
    or None, stats)``; ``norm_kept`` is each row's normaliser (the backend contract's maximum and
    log-sum); ``unscaled_grad_hidden`` is ``((onehot - softmax) * dz/dx) @ weight`` per kept token,
    formed only when ``plan.precompute_grad_hidden``; ``stats`` (``with_stats``, else None) maps
    each of :data:`STAT_NAMES` to an [N] tensor, computed from the same chunks of logits.
    """
    out_dtype = output_dtype(hidden2.dtype)
    keep_idx = (labels1 != plan.ignore_index).nonzero().squeeze(1)
    labels_kept = labels1.index_select(0, keep_idx).to(torch.int64).contiguous()
    kept = keep_idx.numel()
    logp_kept = torch.empty(kept, dtype=out_dtype, device=hidden2.device)
    norm_kept = torch.empty(kept, 2, dtype=out_dtype, device=hidden2.device)
    unscaled = None
    if plan.precompute_grad_hidden:
        unscaled = torch.empty(kept, hidden2.shape[1], dtype=hidden2.dtype, device=hidden2.device)
    stats_kept = empty_stats((kept,), out_dtype, hidden2.device) if with_stats else None
    if kept:
        buffer = hidden2.new_empty(min(plan.chunk, kept), weight.shape[0])
    for start in range(0, kept, plan.chunk):
        end = min(kept, start + plan.chunk)
        hidden_rows = hidden2.index_select(0, keep_idx[start:end])
        logits = linear_into(buffer[: end - start], hidden_rows, weight, bias)
        labels2 = labels_kept[start:end].unsqueeze(0)
        logp2, norm2 = plan.backend.forward(logits.unsqueeze(0), labels2, plan.ignore_index, *plan.transform)
        logp_kept[start:end] = logp2[0]
        norm_kept[start:end] = norm2[0]
        if stats_kept is not None:  # before the chunk may be overwritten below
            chunk_stats_into(stats_kept, slice(start, end), logits, norm2[0], labels_kept[start:end],
                             *plan.transform)
        if unscaled is not None:
            ones = torch.ones_like(logp2)
            plan.backend.backward(logits.unsqueeze(0), labels2, norm2, ones, plan.ignore_index,
                                  logits.unsqueeze(0), *plan.transform)
            runs = kept_vocab_runs(logits, plan.grad_filter, 1.0)
            unscaled[start:end] = grad_hidden_from_runs(logits, weight, runs)
    logp = torch.zeros(labels1.shape[0], dtype=out_dtype, device=hidden2.device)
    logp.index_copy_(0, keep_idx, logp_kept)
    stats = None
    if stats_kept is not None:
        stats = empty_stats(labels1.shape, out_dtype, hidden2.device)
        for name in STAT_NAMES:
            stats[name].index_copy_(0, keep_idx, stats_kept[name])
    return logp, keep_idx, labels_kept, norm_kept, unscaled, stats


def backward_pass(grad_logp: Tensor, hidden2: Tensor, weight: Tensor, bias: Tensor | None,
                  keep_idx: Tensor, labels_kept: Tensor, norm_kept: Tensor, plan: LinearPlan,
                  needs: tuple[bool, bool, bool]):
    """Recomputing backward: (grad_hidden, grad_weight, grad_bias), None where not needed.

    With a weight (or bias) gradient: vocabulary-major (:func:`vocab_major_backward`), so the
    weight gradient is written once per vocabulary block and no [V, H] float32 accumulator exists.
    With only the hidden gradient: token-major, each chunk's rows of grad_hidden written once.
    """
    need_hidden, need_weight, need_bias = needs
    kept = keep_idx.numel()
    grad_kept = grad_logp.index_select(0, keep_idx).to(norm_kept.dtype)
    if need_weight or (need_bias and bias is not None):
        hidden_kept = hidden2.index_select(0, keep_idx)
        columns = vocab_block_columns(plan.chunk * weight.shape[0] * hidden2.element_size(), kept,
                                      hidden2.dtype, weight.shape[0])
        grad_kept_hidden, grad_weight, grad_bias = vocab_major_backward(
            grad_kept, hidden_kept, weight, bias, labels_kept, norm_kept, plan.backend, columns, needs,
            plan.grad_filter, *plan.transform)
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros_like(hidden2).index_copy_(0, keep_idx, grad_kept_hidden)
        return grad_hidden, grad_weight, grad_bias
    grad_hidden = torch.zeros_like(hidden2) if need_hidden else None
    if kept and need_hidden:
        buffer = hidden2.new_empty(min(plan.chunk, kept), weight.shape[0])
    for start in range(0, kept if need_hidden else 0, plan.chunk):
        end = min(kept, start + plan.chunk)
        rows = keep_idx[start:end]
        logits = linear_into(buffer[: end - start], hidden2.index_select(0, rows), weight, bias)
        grad_rows = grad_kept[start:end]
        # In place: the chunk's logits become its d_logits (no second [chunk, V] buffer).
        plan.backend.backward(logits.unsqueeze(0), labels_kept[start:end].unsqueeze(0),
                              norm_kept[start:end].unsqueeze(0), grad_rows.unsqueeze(0),
                              plan.ignore_index, logits.unsqueeze(0), *plan.transform)
        scale = grad_rows.abs().max().item() if plan.grad_filter is not None else 1.0
        runs = kept_vocab_runs(logits, plan.grad_filter, scale)
        grad_hidden.index_copy_(0, rows, grad_hidden_from_runs(logits, weight, runs))
    return grad_hidden, None, None


def scale_unscaled_grad_hidden(grad_logp: Tensor, unscaled: Tensor, keep_idx: Tensor,
                               shape: torch.Size, chunk: int) -> Tensor:
    """grad_hidden[t] = g[t] * unscaled[t] (fp32 product, one rounding), zeros on ignored rows."""
    grad_hidden = unscaled.new_zeros(shape)
    math_dtype = torch.promote_types(unscaled.dtype, torch.float32)
    for start in range(0, keep_idx.numel(), chunk):
        rows = keep_idx[start:start + chunk]
        g = grad_logp.index_select(0, rows).to(math_dtype).unsqueeze(1)
        grad_hidden.index_copy_(0, rows, (unscaled[start:start + chunk].to(math_dtype) * g).to(unscaled.dtype))
    return grad_hidden


class _LinearTokenLogprobs(torch.autograd.Function):
    """Returns the log-probs, followed by the statistics of :data:`STAT_NAMES` when ``with_stats``
    (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden2, weight, bias, labels1, plan, with_stats):
        logp, keep_idx, labels_kept, norm_kept, unscaled, stats = forward_pass(
            hidden2, weight, bias, labels1, plan, with_stats)
        ctx.plan = plan
        if unscaled is not None:
            # Only hidden needs a gradient and it is formed already: keep nothing else alive.
            ctx.hidden_shape = hidden2.shape
            ctx.save_for_backward(keep_idx, unscaled)
        else:
            ctx.save_for_backward(hidden2, weight, bias, keep_idx, labels_kept, norm_kept)
        if stats is None:
            return logp
        ctx.mark_non_differentiable(*stats.values())
        return (logp, *(stats[name] for name in STAT_NAMES))

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        plan = ctx.plan
        if plan.precompute_grad_hidden:
            keep_idx, unscaled = ctx.saved_tensors
            grad_hidden = scale_unscaled_grad_hidden(grad_logp, unscaled, keep_idx, ctx.hidden_shape, plan.chunk)
            return grad_hidden, None, None, None, None, None
        hidden2, weight, bias, keep_idx, labels_kept, norm_kept = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        # The backward may run where autocast is on (CPU autocast, same thread): the matmuls
        # must stay in the inputs' dtype, like the forward's.
        with torch.autocast(hidden2.device.type, enabled=False):
            grads = backward_pass(grad_logp, hidden2, weight, bias, keep_idx, labels_kept, norm_kept,
                                  plan, needs)
        return (*grads, None, None, None)


# --------------------------------------------------------------------------- public API


def validate_linear_inputs(hidden, weight, labels, bias, ignore_index, backend="auto") -> None:
    """ValueError naming the argument for anything the chunks and kernels must never see."""
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden: expected float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., T, H], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected [V, {hidden.shape[-1]}] (H of hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype} "
            "(cast one of them; the logits are computed in the inputs' dtype)"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (V of weight), got {got}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias: expected dtype {hidden.dtype} like hidden, got {bias.dtype}")
    for name, value in (("weight", weight), ("labels", labels), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} like hidden, got {value.device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer dtype (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without H), "
            f"got {tuple(labels.shape)}"
        )
    check_ignore_index(ignore_index)
    vocab = weight.shape[0]
    named = os.environ.get(ENV_VAR, "") if backend == "auto" else backend
    if labels.numel() and labels_checked_on_host(labels, named):  # on a GPU: no sync unless asked
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels: every label must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {first} ({int(bad.sum())} out-of-range labels)"
            )


def make_plan(hidden, weight, bias, *, ignore_index, chunk_size, memory_budget, mode, grad_filter,
              backend, num_rows, wants_grad, weight_grad_dtype=None, logit_scale=1.0,
              softcap=None) -> LinearPlan:
    """Check the options and decide the chunk size and whether the forward pre-forms grad_hidden."""
    logit_scale, softcap = validate_logit_transform(logit_scale, softcap)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget: expected a positive number of bytes or None, got {memory_budget!r}")
    if grad_filter is not None and (isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float))
                                    or not 0 < grad_filter < 1):
        raise ValueError(f"grad_filter: expected None or a threshold in (0, 1), got {grad_filter!r}")
    if weight_grad_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(
            f"weight_grad_dtype: expected None, torch.float32 or the weight's dtype {weight.dtype}, "
            f"got {weight_grad_dtype!r}"
        )
    if chunk_size is None:
        budget = memory_budget if memory_budget is not None else DEFAULT_BUDGETS[mode]
        chunk_size = rows_for_budget(budget, weight.shape[0], hidden.dtype, num_rows)
    # The kernels see fresh contiguous [chunk, V] buffers: aligned exactly when V % 16 == 0.
    kind = cuda_kind(weight.shape[0] % 16 == 0, chunk_size, hidden.device) if hidden.is_cuda else None
    chosen = resolve_backend(backend, hidden, kind)
    frozen_params = not weight.requires_grad and (bias is None or not bias.requires_grad)
    precompute = mode == "default" and wants_grad and hidden.requires_grad and frozen_params
    return LinearPlan(chosen, chunk_size, ignore_index,
                      None if grad_filter is None else float(grad_filter), precompute, weight_grad_dtype,
                      logit_scale, softcap)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mode: str = "default",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    grad_filter: float | None = None,
    backend: str = "auto",
    weight_grad_dtype: torch.dtype | None = None,
    return_stats: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without materialising the [N, V] logits.

    hidden ``[..., T, H]``, weight ``[V, H]`` (same dtype), labels ``[..., T]`` aligned with
    hidden (``labels[t]`` is the token predicted from ``hidden[t]``), bias ``[V]`` or None.
    Returns float32 ``[..., T]`` (float64 for float64 inputs), 0.0 where ``labels == ignore_index``;
    differentiable w.r.t. hidden, weight and bias.

    ``mode``: ``"default"`` or ``"low_memory"`` (module docstring); ``chunk_size`` (rows of logits
    per chunk) overrides ``memory_budget`` (bytes of logits per chunk; 256 MiB / 32 MiB by mode).
    ``grad_filter``: None (exact) or a threshold in (0, 1) for the approximate gradient filter.
    ``backend``: as for :func:`pyalign.token_logprobs`. ``weight_grad_dtype`` (None, float32 or
    the weight's dtype) is accepted for symmetry with the loss; the op's vocabulary-major backward
    writes each block of the weight gradient once, so it changes nothing here.

    ``logit_scale`` and ``softcap``: the logit transform of :func:`pyalign.token_logprobs`, applied
    to each chunk inside the kernels: the log-probs (and the statistics) are those of
    ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (without softcap:
    ``z = logit_scale * (...)``), with gradients through the transform.

    ``return_stats=True`` returns ``(logp, stats)``: ``stats`` maps each name to a tensor shaped
    like ``labels``, computed from the same chunks of logits as the log-probs (no extra matmul),
    without gradient, on the positions whose label is kept (the fields of TRL's
    ``FusedCausalLMOutput``, temperature 1):

    - ``"entropy"``: ``-sum_v p_v log p_v`` of the softmax (float32; float64 inputs: float64);
    - ``"mean_logits"``: ``sum_v z_v / V``, z the logits in the input dtype;
    - ``"log_sum_sq_probs"``: ``log sum_v p_v^2``;
    - ``"argmax"`` (int64): the first index of the largest logit;
    - ``"is_top1"`` (bool): ``argmax == label``.

    On ignored positions: 0.0 for the float statistics, -1 for ``argmax``, False for ``is_top1``.
    The statistics are those of z; ``argmax`` is that of the logits before the transform (the
    same index: the transforms are increasing).
    """
    check_flag("return_stats", return_stats)
    validate_linear_inputs(hidden, weight, labels, bias, ignore_index, backend)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    num_rows = labels.numel()
    plan = make_plan(hidden, weight, bias, ignore_index=ignore_index, chunk_size=chunk_size,
                     memory_budget=memory_budget, mode=mode, grad_filter=grad_filter,
                     backend=backend, num_rows=num_rows, wants_grad=wants_grad,
                     weight_grad_dtype=weight_grad_dtype, logit_scale=logit_scale, softcap=softcap)
    out_dtype = output_dtype(hidden.dtype)
    if num_rows == 0 or weight.shape[0] == 0:
        # Still connected to the graph so that .backward() through an empty batch works.
        logp = (hidden.sum(-1) * 0).to(out_dtype)
        return (logp, empty_stats(labels.shape, out_dtype, hidden.device)) if return_stats else logp
    hidden2 = hidden.reshape(num_rows, hidden.shape[-1])
    labels1 = labels.reshape(num_rows)
    with torch.autocast(hidden.device.type, enabled=False):
        if wants_grad:
            outputs = _LinearTokenLogprobs.apply(hidden2, weight, bias, labels1, plan, return_stats)
            logp, stats = (outputs[0], dict(zip(STAT_NAMES, outputs[1:]))) if return_stats else (outputs, None)
        else:
            logp, *_, stats = forward_pass(hidden2, weight, bias, labels1, plan, return_stats)
    logp = logp.view(labels.shape)
    if not return_stats:
        return logp
    return logp, {name: value.view(labels.shape) for name, value in stats.items()}
