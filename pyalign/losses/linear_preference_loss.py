"""``linear_preference_loss``: a preference loss from hidden states and the lm_head weight.

``PreferenceLoss(...)(hidden=..., weight=..., labels=...)`` lands here. Rows are chosen first,
then rejected: hidden ``[2B, T, H]``, labels ``[2B, T]`` aligned with hidden.

Two paths, both exact:

- **Pair groups (6*N*H*V flops, 4*N*H*V with a frozen weight)**, ``mode="default"`` for losses
  that are a mean over pairs of per-pair terms (every loss except ``kto_pair`` with ``kl=None``,
  whose reference point is a batch statistic). A few pairs at a time: their logits (kept tokens
  only, input dtype, at most ``memory_budget`` bytes, 512 MiB by default) -> token log-probs ->
  the pairs' sequence log-probs -> the pairs' share of the loss and its gradient w.r.t. those
  log-probs -> the logits overwritten in place by ``d_logits`` -> ``grad_hidden`` for those rows
  and ``grad_weight += d_logits^T @ hidden`` (fp32 accumulation for half-precision weights). The
  gradients are formed in the forward; the returned loss hands them back, scaled by the upstream
  gradient, in its backward. The logits of one group are the only ``[*, V]`` buffer.
- **Through the op**, otherwise (``mode="low_memory"``, a coupled loss, a trainable
  half-precision weight whose pairs need several groups, where summing the groups' weight
  gradients would take a [V, H] float32 accumulator): token log-probs by
  :func:`linear_token_logprobs` (chunked, logits recomputed in the backward, the weight gradient
  vocabulary-major), then the loss by autograd: 8*N*H*V flops (4 or 6 with a frozen weight,
  docs/fused_linear.md), O(chunk) memory, any loss. A pair whose logits alone exceed the group
  budget takes this path by itself while the other pairs stay in groups.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pyalign.losses.pairwise import LossOutput
from pyalign.ops.linear_token_logprobs import (
    MIB, MODES, WeightGradSink, grad_hidden_from_runs, kept_vocab_runs, linear_into, linear_token_logprobs,
    make_plan, rows_for_budget, validate_linear_inputs,
)
from pyalign.reference import IGNORE_INDEX, output_dtype

PAIR_GROUP_BUDGET = 512 * MIB  # logits bytes of one group of pairs (one 1024+1024-token pair at V=128k, bf16)


def is_pair_separable(loss_fn) -> bool:
    """Whether the loss is a mean of per-pair terms that need only their own pair.

    True for every ``PreferenceLoss`` except ``kto_pair`` without a given ``kl`` (its batch KL
    estimate couples the pairs); False for anything else, which takes the exact general path.
    """
    name = getattr(loss_fn, "loss_name", None)
    if name is None:
        return False
    return not (name == "kto_pair" and getattr(loss_fn, "loss_kwargs", {}).get("kl") is None)


def _loss_callable(loss_fn) -> Callable[..., LossOutput]:
    compute = getattr(loss_fn, "loss_from_sequence_logprobs", None)
    if compute is not None:
        return compute
    if callable(loss_fn):
        return loss_fn
    raise ValueError(
        "loss_fn: expected a PreferenceLoss or a callable (policy_logps, ref_logps, chain_logps, "
        f"num_tokens) -> LossOutput, got {type(loss_fn).__name__}"
    )


def _take(values: Tensor | None, rows: Tensor) -> Tensor | None:
    """Columns ``rows`` of [2B] / [n, 2B] per-sequence values."""
    return None if values is None else values.index_select(values.dim() - 1, rows)


class _PrecomputedGradients(torch.autograd.Function):
    """A loss value whose gradients were formed in the forward; backward scales and returns them."""

    @staticmethod
    def forward(ctx, loss_value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss_value.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place (the stored gradients are ours alone): no copy of the weight gradient,
        # and no read of grad_loss on the host, which would synchronise with the GPU. x * 1.0 is
        # exact, so the usual loss.backward() leaves them bit for bit as formed.
        grads = tuple(None if g is None else g.mul_(grad_loss) for g in ctx.grads)
        del ctx.grads
        return (None, *grads, None, None, None)


def _pair_groups(pair_tokens: list[int], max_rows: int) -> tuple[list[list[int]], list[int]]:
    """Groups of pairs (consecutive among those that fit) whose kept tokens fit ``max_rows``
    logits rows, and the pairs that do not fit alone (they go through the op, one by one)."""
    groups: list[list[int]] = []
    alone: list[int] = []
    rows = 0
    for pair, tokens in enumerate(pair_tokens):
        if tokens > max_rows:
            alone.append(pair)
            continue
        if not groups or rows + tokens > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(pair)
        rows += tokens
    return groups, alone


def _pair_group_loss(compute, hidden, weight, bias, labels, ref_logps, chain_logps, *, plan,
                     average, groups, alone, counts, op_kwargs) -> LossOutput:
    """The 6NHV path: loss and gradients of each group of pairs in one pass over its logits; the
    pairs in ``alone`` (each over the budget by itself) through the op, by autograd."""
    two_b, time, width = hidden.shape
    num_pairs = two_b // 2
    labels_flat = labels.reshape(-1)
    kept = labels != plan.ignore_index
    out_dtype = output_dtype(hidden.dtype)
    seq_logps = torch.zeros(two_b, dtype=out_dtype, device=hidden.device)
    alone_share = None
    if alone:
        pairs = torch.tensor(alone, device=hidden.device)
        rows = torch.cat([pairs, pairs + num_pairs])
        token_logps = linear_token_logprobs(hidden.index_select(0, rows), weight, labels.index_select(0, rows),
                                            bias=bias, ignore_index=plan.ignore_index, **op_kwargs)
        alone_seq = token_logps.sum(-1)
        if average:
            alone_seq = alone_seq / counts.index_select(0, rows).clamp(min=1).to(out_dtype)
        seq_logps[rows] = alone_seq.detach()
        alone_out = compute(alone_seq, _take(ref_logps, rows), _take(chain_logps, rows), counts.index_select(0, rows))
        alone_share = alone_out.loss * (len(alone) / num_pairs)
    with torch.no_grad():
        hidden2 = hidden.reshape(two_b * time, width)
        grad_hidden2 = torch.zeros_like(hidden2) if hidden.requires_grad else None
        sink = WeightGradSink(weight, bias, weight.requires_grad, bias is not None and bias.requires_grad,
                              single_step=len(groups) == 1, accumulate_dtype=plan.weight_grad_dtype)
        for group in groups:
            pairs = torch.tensor(group, device=hidden.device)
            rows = torch.cat([pairs, pairs + num_pairs])
            where = kept.index_select(0, rows).nonzero()  # [K, 2]: (row within the group, t)
            row_of_token = where[:, 0]
            tokens = rows.index_select(0, row_of_token) * time + where[:, 1]
            if tokens.numel() == 0:  # every token of these pairs is ignored: log-probs 0, no gradient
                continue
            hidden_rows = hidden2.index_select(0, tokens)
            labels_rows = labels_flat.index_select(0, tokens).to(torch.int64).unsqueeze(0)
            logits = linear_into(hidden2.new_empty(tokens.numel(), weight.shape[0]), hidden_rows, weight, bias)
            logp2, lse2 = plan.backend.forward(logits.unsqueeze(0), labels_rows, plan.ignore_index)
            group_counts = counts.index_select(0, rows)
            group_seq = torch.zeros(rows.numel(), dtype=out_dtype, device=hidden.device)
            group_seq.index_add_(0, row_of_token, logp2[0])
            if average:
                group_seq = group_seq / group_counts.clamp(min=1).to(out_dtype)
            seq_logps[rows] = group_seq
            with torch.enable_grad():
                leaf = group_seq.detach().requires_grad_()
                group_out = compute(leaf, _take(ref_logps, rows), _take(chain_logps, rows), group_counts)
                (grad_seq,) = torch.autograd.grad(group_out.loss * (len(group) / num_pairs), leaf)
            if average:
                grad_seq = grad_seq / group_counts.clamp(min=1).to(out_dtype)
            grad_tokens = grad_seq.index_select(0, row_of_token).to(out_dtype).unsqueeze(0).contiguous()
            # In place: the group's logits become its d_logits.
            plan.backend.backward(logits.unsqueeze(0), labels_rows, lse2, grad_tokens,
                                  plan.ignore_index, logits.unsqueeze(0))
            scale = grad_tokens.abs().max().item() if plan.grad_filter is not None and tokens.numel() else 1.0
            runs = kept_vocab_runs(logits, plan.grad_filter, scale)
            if grad_hidden2 is not None:
                grad_hidden2.index_copy_(0, tokens, grad_hidden_from_runs(logits, weight, runs))
            sink.add(logits, hidden_rows, runs)
            del logits
        final = compute(seq_logps, ref_logps, chain_logps, counts)
    grad_hidden = None if grad_hidden2 is None else grad_hidden2.view(hidden.shape)
    loss = _PrecomputedGradients.apply(final.loss, hidden, weight, bias, grad_hidden,
                                       sink.weight_grad(), sink.bias_grad())
    if alone_share is not None:
        loss = loss + (alone_share - alone_share.detach())  # the value stays final.loss exactly
    return LossOutput(loss, final.chosen_rewards, final.rejected_rewards, final.extra)


def linear_preference_loss(
    loss_fn,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logps: Tensor | None = None,
    chain_logps: Tensor | None = None,
    ignore_index: int | None = None,
    average: bool | None = None,
    mode: str = "default",
    memory_budget: int | None = None,
    grad_filter: float | None = None,
    backend: str | None = None,
    pair_separable: bool | None = None,
    weight_grad_dtype: torch.dtype | None = None,
) -> LossOutput:
    """A preference loss from hidden states ``[2B, T, H]`` and the lm_head ``weight`` ``[V, H]``.

    ``loss_fn``: a :class:`pyalign.PreferenceLoss` (its ``ignore_index``, ``average`` and
    ``backend`` are the defaults here) or a callable ``(policy_logps [2B], ref_logps, chain_logps,
    num_tokens [2B]) -> LossOutput`` whose loss is a mean over pairs. ``mode``: ``"default"`` (pair
    groups when the loss allows, ``memory_budget`` bytes of logits per group, 512 MiB by default)
    or ``"low_memory"`` (through :func:`linear_token_logprobs`, 32 MiB chunks by default).
    ``pair_separable``: whether the loss needs only each pair's own log-probs (default: inferred
    for PreferenceLoss, False for other callables). ``grad_filter``: the approximate gradient
    filter of :func:`linear_token_logprobs` (None: exact).

    ``weight_grad_dtype`` decides how a trainable half-precision weight's gradient is summed when
    the pairs need several groups: None (default) never holds a [V, H] float32 buffer: the batch
    goes through the op, whose vocabulary-major backward writes each block of the gradient once
    (8*N*H*V flops); ``torch.float32`` keeps the pair groups (6*N*H*V) and sums their gradients in
    a [V, H] float32 accumulator (4*V*H bytes more); the weight's own dtype keeps the pair groups
    and sums in place (one rounding per group). A frozen or float32 weight, or a single group,
    needs no accumulator: pair groups then. A pair whose logits alone exceed the budget goes
    through the op by itself; the other pairs stay in groups.
    """
    compute = _loss_callable(loss_fn)
    ignore_index = getattr(loss_fn, "ignore_index", IGNORE_INDEX) if ignore_index is None else ignore_index
    average = bool(getattr(loss_fn, "average", False)) if average is None else average
    backend = getattr(loss_fn, "backend", "auto") if backend is None else backend
    separable = is_pair_separable(loss_fn) if pair_separable is None else bool(pair_separable)
    validate_linear_inputs(hidden, weight, labels, bias, ignore_index, backend)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [2B, T, H] (chosen rows first), got {tuple(hidden.shape)}")
    if hidden.shape[0] % 2:
        raise ValueError(
            f"hidden: expected an even number of rows (chosen rows first, then rejected), got {hidden.shape[0]}"
        )
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    counts = (labels != ignore_index).sum(-1)
    # Bad ref_logps / chain_logps fail here, before any matmul, with the loss's own messages.
    with torch.no_grad():
        compute(torch.zeros(hidden.shape[0], device=hidden.device), ref_logps, chain_logps, counts)

    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    groups, alone = [], []
    if wants_grad and mode == "default" and separable:
        budget = PAIR_GROUP_BUDGET if memory_budget is None else memory_budget
        max_rows = rows_for_budget(budget, weight.shape[0], hidden.dtype, labels.numel())
        num_pairs = hidden.shape[0] // 2
        groups, alone = _pair_groups((counts[:num_pairs] + counts[num_pairs:]).tolist(), max_rows)
        half_weight_trained = weight.dtype in (torch.bfloat16, torch.float16) and (
            weight.requires_grad or (bias is not None and bias.requires_grad))
        if half_weight_trained and len(groups) > 1 and weight_grad_dtype is None:
            groups, alone = [], []  # no [V, H] float32 accumulator: the op's vocabulary-major backward
    if groups:
        plan = make_plan(hidden, weight, bias, ignore_index=ignore_index, chunk_size=None,
                         memory_budget=None, mode=mode, grad_filter=grad_filter, backend=backend,
                         num_rows=labels.numel(), wants_grad=wants_grad,
                         weight_grad_dtype=weight_grad_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return _pair_group_loss(
                compute, hidden, weight, bias, labels, ref_logps, chain_logps, plan=plan, average=average,
                groups=groups, alone=alone, counts=counts,
                op_kwargs={"mode": mode, "memory_budget": memory_budget, "grad_filter": grad_filter,
                           "backend": backend})

    token_logps = linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, mode=mode,
        memory_budget=memory_budget,
        grad_filter=grad_filter, backend=backend, weight_grad_dtype=weight_grad_dtype,
    )
    seq_logps = token_logps.sum(-1)
    if average:
        seq_logps = seq_logps / counts.clamp(min=1).to(seq_logps.dtype)
    return compute(seq_logps, ref_logps, chain_logps, counts)
