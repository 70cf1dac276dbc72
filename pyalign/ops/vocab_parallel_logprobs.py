"""``vocab_parallel_token_logprobs``: token log-probs of ``hidden @ weight.T (+ bias)`` when the lm_head
weight ``[V, H]`` is split along the vocabulary over the processes of a group (FSDP2's ``Shard(0)``),
without gathering the weight and without materialising the ``[N, V]`` logits (SPEC 3.9).

Process ``r`` of ``p`` holds rows ``[start_r, end_r)`` of the weight (``torch.chunk`` over dim 0,
as DTensor and FSDP2 split it: the last shards are shorter, possibly empty, when ``p`` does not
divide ``V``). Each process passes its own tokens (``hidden [..., T, H]``, ``labels [..., T]``).

Forward, on every process:

1. drop the tokens whose label is ``ignore_index`` (they cost nothing, not even communication),
   and all-gather the kept hidden states and labels of every process: ``[K_all, H]``;
2. per chunk of those rows, the logits of this process's vocabulary slice ``[chunk, V_r]`` (one
   reused buffer, as in :mod:`pyalign.ops.linear_token_logprobs`); the backend kernel gives the
   slice's normaliser ``(M_r, L_r)`` (its maximum and log-sum, pyalign/reference.py), and the
   label's logit is read from the same chunk where this process owns the label (0 elsewhere);
3. two all-reductions: ``M = max_r M_r``, then the sum of ``[exp(a (M_r - M) + L_r), label y]``:
   ``L = log(sum)``, and the label's y arrives from the one process that owns it;
4. ``logp = a (label y - M) - L``; each process keeps the rows of its own tokens.

The logit transform (``logit_scale``, ``softcap``) is elementwise, so each process applies it to
its own slice inside the kernels; ``y`` and ``a`` are the reference's (``y`` the logits, or the
soft-capped logits).

Backward: the upstream gradient of every kept token is all-gathered (``K_all`` numbers), then
:func:`pyalign.ops.linear_chunks.vocab_major_backward` recomputes this slice's logits block by block
with the global normaliser: the weight (and bias) gradient of the slice is the sum over the tokens of
every process, written once, with no communication; the hidden states' gradient ``[K_all, H]`` is
reduce-scattered (summed) back to the process that owns each token.

With a frozen weight (and bias) in the default mode (LoRA), as in
:mod:`pyalign.ops.linear_token_logprobs`, the forward also forms, from the same chunks of logits,
this process's share of ``(onehot - softmax) @ W`` per token: ``w * (onehot_r - softmax_r) @ W_r +
(1 - w) * onehot_r @ W_r`` (each term times ``dz/dx``) with ``softmax_r`` the slice's own softmax
and ``w = exp(a (M_r - M) + L_r - L)`` the slice's share of the probability mass; the shares of all processes sum to the whole. The
backward then only scales it by the upstream gradient and reduce-scatters it: 4*N*H*V flops in all
over the processes instead of 6, and nothing but that ``[K_all, H]`` share saved.

Consistency across processes is checked with one small all-gather before any large one: the
shards must tile ``[0, V)`` in rank order, ``H``, dtype, and whether a gradient is wanted must
agree, and a process whose inputs are invalid (a bad label, a wrong shape) makes *every* process
raise the same ValueError instead of leaving the others waiting in a collective. Every process of
the group must call the op, and every process must backpropagate through its output when one does
(the backward is collective too), as with any FSDP module.

``weight`` is either a DTensor (placements ``(Shard(0),)`` on a 1-D device mesh; its local shard
and the mesh's process group are used, and the weight gradient arrives as a DTensor with the same
layout), or this process's rows as a plain tensor with ``vocab_start``, ``vocab_size`` and ``group``.
Without an initialised process group (or with a group of one) it is a single-process op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pyalign import distributed as pdist
from pyalign.ops.backends import ENV_VAR
from pyalign.ops.linear_chunks import (
    linear_into, non_label_gradient, rows_for_budget, vocab_block_columns, vocab_major_backward,
)
from pyalign.ops.linear_token_logprobs import DEFAULT_BUDGETS, MODES, make_plan
from pyalign.ops.token_logprobs import labels_checked_on_host
from pyalign.reference import IGNORE_INDEX, exponent_scale, monotone_logits, output_dtype, transform_derivative

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# Columns of the per-process record exchanged before any large collective.
_META = ("problem", "kept", "local_vocab", "vocab_start", "vocab_size", "hidden_size", "dtype",
         "wants_grad", "hidden_grad", "has_bias")


# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``[vocab_size, H]`` tensor that ``rank`` of ``world`` holds under
    ``Shard(0)``: ``torch.chunk`` semantics (DTensor's and FSDP2's), ``ceil(V / world)`` rows per
    rank, the last ones shorter or empty."""
    per_rank = -(-vocab_size // world) if world else vocab_size
    start = min(vocab_size, rank * per_rank)
    return start, min(vocab_size, start + per_rank)


@dataclass(frozen=True)
class VocabShard:
    """This process's slice of the vocabulary and the group the slices are spread over."""

    weight: Tensor  # [V_r, H], plain tensor (a DTensor's local shard, autograd-connected to it)
    bias: Tensor | None  # [V_r] or None
    vocab_start: int
    vocab_size: int
    group: object  # a ProcessGroup, or None for a single process
    rank: int
    world: int


def _is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:  # a torch without DTensor cannot hold one
        return False
    return isinstance(value, DTensor)


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def _dtensor_local(name: str, value):
    """``(local shard, mesh group, rank, world, first row)`` of a DTensor sharded along dim 0 of a
    1-D mesh. Its placements and mesh are global metadata, the same on every process, so a wrong
    layout raises here on all of them alike."""
    from torch.distributed.tensor import Shard  # noqa: PLC0415

    mesh = value.device_mesh
    placements = tuple(value.placements)
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(
            f"{name}: expected a DTensor sharded along the vocabulary (dim 0), placements "
            f"(Shard(dim=0),) on a 1-D device mesh, got placements {placements} on a {mesh.ndim}-D mesh "
            "(the vocabulary-parallel log-softmax splits the vocabulary only; HSDP, tensor-parallel "
            "or column-sharded weights need the whole weight: sharded_head='gather')"
        )
    group = mesh.get_group()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    start, _ = shard_range(value.shape[0], rank, world)
    return value.to_local(), group, rank, world, start  # to_local: its gradient returns as a DTensor


def resolve_shard(weight, bias, group, vocab_start, vocab_size) -> tuple[VocabShard, str]:
    """This process's slice and what is wrong with the sharding arguments ("" when nothing), with no
    communication. Only what decides the process group itself raises here; anything that may
    differ between processes is returned as the problem, for :func:`_exchange_meta` to report to
    every process (a ValueError on one process only would leave the others waiting)."""
    if _is_dtensor(weight):
        if weight.dim() != 2:
            raise ValueError(f"weight: expected shape [V, H], got {tuple(weight.shape)}")
        local, mesh_group, rank, world, start = _dtensor_local("weight", weight)
        problem = ""
        if vocab_start is not None or vocab_size is not None:
            problem = "vocab_start, vocab_size: not used with a DTensor weight (its layout gives them)"
        elif group is not None and _group_ranks(group) != _group_ranks(mesh_group):
            problem = (f"group: ranks {_group_ranks(group)} differ from the ranks {_group_ranks(mesh_group)} of the "
                       "weight's device mesh, over which its vocabulary is sharded")
        elif local.shape[0] != shard_range(weight.shape[0], rank, world)[1] - start:
            problem = (f"weight: the local shard has {local.shape[0]} rows, but Shard(0) of {weight.shape[0]} rows "
                       f"over {world} ranks gives rank {rank} {shard_range(weight.shape[0], rank, world)} "
                       "(a custom shard layout is not supported)")
        local_bias = None
        if bias is not None and not problem:
            if not _is_dtensor(bias) or tuple(bias.shape) != (weight.shape[0],):
                got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
                problem = f"bias: expected a DTensor of shape [{weight.shape[0]}] sharded like weight, got {got}"
            else:
                local_bias, bias_group, _, _, _ = _dtensor_local("bias", bias)
                if _group_ranks(bias_group) != _group_ranks(mesh_group):
                    problem = "bias: its device mesh differs from the weight's"
        return VocabShard(local, local_bias, start, weight.shape[0], mesh_group, rank, world), problem
    distributed = pdist.is_initialized() and (group is not None or dist.get_world_size() > 1)
    if distributed:
        if group is None:
            group = dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
        world = dist.get_world_size(group)
    else:
        if group is not None:
            raise ValueError("group: given, but no process group is initialised (torch.distributed)")
        rank, world = 0, 1
    problem = ""
    rows = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    if _is_dtensor(bias):
        problem = "bias: a DTensor bias needs a DTensor weight (pass both sharded, or both local)"
    elif not isinstance(weight, Tensor):
        problem = f"weight: expected a torch.Tensor or DTensor, got {type(weight).__name__}"
    elif weight.dim() != 2:
        problem = f"weight: expected this process's rows [V_r, H], got {tuple(weight.shape)}"
    elif world > 1 and (vocab_start is None or vocab_size is None):
        problem = ("vocab_start, vocab_size: required with a plain (local) weight over several processes: "
                   "the first vocabulary row this process holds and the full vocabulary size")
    vocab_start = 0 if vocab_start is None else vocab_start
    vocab_size = rows if vocab_size is None else vocab_size
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if not problem and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problem = f"{name}: expected a non-negative int, got {value!r}"
    if not problem and vocab_start + rows > vocab_size:
        problem = (f"vocab_start: rows [{vocab_start}, {vocab_start + rows}) of weight lie outside the "
                   f"vocabulary [0, {vocab_size})")
    if not problem and bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (rows,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        problem = f"bias: expected this process's [{rows}] entries (like weight's rows), got {got}"
    if problem:  # placeholders: the exchange only reads them when no process has a problem
        vocab_start, vocab_size = 0, 0
    return VocabShard(weight, bias, vocab_start, vocab_size, group if world > 1 else None, rank, world), problem


def _local_problem(hidden, shard: VocabShard, labels, ignore_index, backend) -> str:
    """What is wrong with this process's own inputs ("" when nothing): data-dependent checks, which
    may fail on one process only, so they are reported to every process before anything else."""
    weight, bias = shard.weight, shard.bias
    if not isinstance(hidden, Tensor) or not isinstance(labels, Tensor):
        bad = "hidden" if not isinstance(hidden, Tensor) else "labels"
        return f"{bad}: expected a torch.Tensor"
    if hidden.dtype not in _DTYPE_CODES:
        return f"hidden: expected float32, bfloat16, float16 or float64, got {hidden.dtype}"
    if hidden.dim() < 1:
        return "hidden: expected shape [..., T, H], got a scalar"
    if weight.shape[1] != hidden.shape[-1]:
        return f"weight: expected [V_r, {hidden.shape[-1]}] (H of hidden), got {tuple(weight.shape)}"
    if weight.dtype != hidden.dtype:
        return (f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype} "
                "(cast one of them; the logits are computed in the inputs' dtype)")
    if bias is not None and bias.dtype != hidden.dtype:
        return f"bias: expected dtype {hidden.dtype} like hidden, got {bias.dtype}"
    for name, value in (("weight", weight), ("labels", labels), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            return f"{name}: expected device {hidden.device} like hidden, got {value.device}"
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return f"labels: expected an integer dtype (int64), got {labels.dtype}"
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        return (f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without H), "
                f"got {tuple(labels.shape)}")
    named = os.environ.get(ENV_VAR, "") if backend == "auto" else backend
    if labels.numel() and labels_checked_on_host(labels, named):
        bad = ((labels < 0) | (labels >= shard.vocab_size)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            return (f"labels: every label must be in [0, {shard.vocab_size}) or equal ignore_index={ignore_index}; "
                    f"found {first} ({int(bad.sum())} out-of-range labels)")
    return ""


def _exchange_meta(shard: VocabShard, hidden, kept: int, wants_grad: bool, problem: str) -> list[dict]:
    """Every process's record (:data:`_META`), in rank order; raises the same ValueError on every
    process when one of them has a problem or the records disagree."""
    ok = not problem
    local_vocab = shard.weight.shape[0] if ok else 0
    row = [int(not ok), kept, local_vocab, shard.vocab_start, shard.vocab_size,
           hidden.shape[-1] if ok else -1, _DTYPE_CODES.get(hidden.dtype, -1) if ok else -1,
           int(wants_grad), int(ok and hidden.requires_grad), int(shard.bias is not None)]
    device = hidden.device if isinstance(hidden, Tensor) else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    if shard.world > 1:
        table = mine.new_empty(shard.world * len(row))
        _all_gather_single(table, mine, group=shard.group)
        records = table.view(shard.world, len(row)).tolist()
    else:
        records = [row]
    records = [dict(zip(_META, values)) for values in records]
    failed = [rank for rank, record in enumerate(records) if record["problem"]]
    if failed:
        if problem:
            raise ValueError(problem if shard.world == 1 else f"{problem} (on rank {shard.rank})")
        raise ValueError(f"vocab_parallel_token_logprobs: rank(s) {failed} of the group got invalid inputs "
                         "(their own error says which); every rank stops here")
    start = 0
    for rank, record in enumerate(records):
        if record["vocab_start"] != start:
            raise ValueError(
                f"weight: the vocabulary shards must tile [0, V) in rank order; rank {rank} holds rows from "
                f"{record['vocab_start']} but the shards before it end at {start} (is group the process group "
                "the weight is sharded over?)"
            )
        start += record["local_vocab"]
    for field, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size H"),
                        ("dtype", "dtype of hidden"), ("wants_grad", "need for a gradient (grad mode, requires_grad)"),
                        ("hidden_grad", "hidden.requires_grad"), ("has_bias", "presence of a bias")):
        values = [record[field] for record in records]
        if len(set(values)) > 1:
            raise ValueError(f"vocab_parallel_token_logprobs: the ranks disagree on the {what}: {values} "
                             "(every rank of the group must call the op alike)")
    if start != records[0]["vocab_size"]:
        raise ValueError(f"weight: the shards cover {start} vocabulary rows, but vocab_size is "
                         f"{records[0]['vocab_size']} (is group the process group the weight is sharded over?)")
    return records


def _all_gather_rows(local: Tensor, counts: list[int], group) -> Tensor:
    """Rows of every process in rank order, ``[sum(counts), ...]``. The collective needs equal
    sizes (gloo's all-gather does), so each process's rows travel padded to the largest count."""
    world = len(counts)
    k_max = max(counts)
    if world == 1 or k_max == 0:  # every process knows the counts: all skip the collective alike
        return local
    padded = local
    if local.shape[0] != k_max or not local.is_contiguous():
        padded = local.new_zeros((k_max, *local.shape[1:]))
        padded[: local.shape[0]] = local
    out = local.new_empty((world * k_max, *local.shape[1:]))
    _all_gather_single(out, padded, group=group)
    if all(count == k_max for count in counts):
        return out
    return out.index_select(0, _padded_rows(counts, out.device))


def _padded_rows(counts: list[int], device) -> Tensor:
    """Positions of the real rows in the padded ``[world * max(counts)]`` layout."""
    k_max = max(counts)
    return torch.cat([torch.arange(rank * k_max, rank * k_max + count) for rank, count in enumerate(counts)]).to(device)


def _reduce_scatter_rows(rows: Tensor, counts: list[int], rank: int, group) -> Tensor:
    """Sum ``rows`` ``[sum(counts), H]`` over the processes and return this process's block."""
    world = len(counts)
    k_max = max(counts)
    if world == 1 or k_max == 0:
        return rows
    padded = rows.new_zeros((world * k_max, *rows.shape[1:]))
    padded.index_copy_(0, _padded_rows(counts, rows.device), rows)
    out = rows.new_empty((k_max, *rows.shape[1:]))
    _reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=group)
    return out[: counts[rank]]


@dataclass(frozen=True)
class _Run:
    """One call's layout: the processes' kept-token counts and this process's place among them."""

    shard: VocabShard
    counts: list[int]
    backend: object
    rows_per_chunk: int
    column_budget: int  # bytes of logits per vocabulary block in the backward
    ignore_index: int
    grad_filter: float | None
    weight_grad_scale: float
    precompute_grad_hidden: bool = False  # default mode, a frozen weight (and bias), hidden needs a gradient
    transform: tuple[float, float | None] = (1.0, None)  # (logit_scale, softcap)

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.shard.rank])


def _forward(hidden_all: Tensor, labels_all: Tensor, weight: Tensor, bias: Tensor | None, run: _Run):
    """``(logp_all, norm_all, grad_hidden_part)`` over every process's kept tokens ``[K_all]``: the
    log-probs and row normalisers ``[K_all, 2]`` (the same on every process) and, with
    ``run.precompute_grad_hidden``, this process's share of ``(onehot - softmax) dz/dx @ W`` per
    token ``[K_all, H]`` (else None)."""
    shard = run.shard
    out_dtype = output_dtype(hidden_all.dtype)
    a = exponent_scale(*run.transform)
    rows, local_vocab = hidden_all.shape[0], weight.shape[0]
    # An empty slice: maximum -inf and log-sum -inf (exp of it is 0) add nothing to the merge.
    local_norm = torch.full((rows, 2), float("-inf"), dtype=out_dtype, device=hidden_all.device)
    label_y = torch.zeros(rows, dtype=out_dtype, device=hidden_all.device)
    local_labels = labels_all - shard.vocab_start
    owned = (local_labels >= 0) & (local_labels < local_vocab)
    # (onehot_local - softmax_local) dz/dx @ W_r per token, formed from the same chunk of logits as
    # the forward (only with a frozen weight: then nothing else needs the logits in the backward).
    local_part = hidden_all.new_zeros(rows, hidden_all.shape[1]) if run.precompute_grad_hidden else None
    label_derivative = None
    if rows and local_vocab:
        # The kernels take one label in [0, V_r) per row; a row whose label lies in another slice
        # gets 0 here, its log-prob output is not used (only the slice's normaliser is).
        kernel_labels = torch.where(owned, local_labels, 0)
        buffer = hidden_all.new_empty(min(run.rows_per_chunk, rows), local_vocab)
        label_logit = torch.zeros(rows, dtype=out_dtype, device=hidden_all.device)
        for start in range(0, rows, run.rows_per_chunk):
            end = min(rows, start + run.rows_per_chunk)
            logits = linear_into(buffer[: end - start], hidden_all[start:end], weight, bias)
            labels2 = kernel_labels[start:end].unsqueeze(0)
            _, norm2 = run.backend.forward(logits.unsqueeze(0), labels2, -1, *run.transform)
            local_norm[start:end] = norm2[0]
            # The label's logit read from this very chunk: the same rounding as the unsharded op's.
            picked = logits.gather(1, labels2.t()).squeeze(1).to(out_dtype)
            label_logit[start:end] = torch.where(owned[start:end], picked, 0)
            if local_part is not None:
                # In place: the chunk becomes (onehot - softmax_local) dz/dx. A row whose label is
                # elsewhere got label 0: its column 0 is rewritten as a non-label column.
                first = logits[:, 0].to(out_dtype, copy=True)
                ones = torch.ones(1, end - start, dtype=out_dtype, device=logits.device)
                run.backend.backward(logits.unsqueeze(0), labels2, norm2, ones, -1, logits.unsqueeze(0),
                                     *run.transform)
                not_label = non_label_gradient(first, norm2[0], ones[0], *run.transform)
                logits[:, 0] = torch.where(owned[start:end], logits[:, 0].to(out_dtype), not_label).to(logits.dtype)
                torch.mm(logits, weight, out=local_part[start:end])
        label_y = torch.where(owned, monotone_logits(label_logit, *run.transform), 0)
        label_derivative = transform_derivative(label_logit, *run.transform)
    if shard.world == 1 or rows == 0:
        norm = local_norm
        label_y_all = label_y
    else:
        # The maximum and the sum of exponentials stay apart (no log-sum-exp M + L is formed).
        row_max = local_norm[:, 0].clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
        sums = torch.stack([torch.exp((local_norm[:, 0] - row_max) * a + local_norm[:, 1]), label_y])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)  # one owner per label: exact
        norm = torch.stack([row_max, torch.log(sums[0])], dim=1)
        label_y_all = sums[1]
    logp = (label_y_all - norm[:, 0]) * a - norm[:, 1]
    if local_part is None:
        return logp, norm, None
    # This slice's share of (onehot - softmax) dz/dx is w * (onehot_local - local softmax) dz/dx +
    # (1 - w) * onehot_local dz/dx(label) with w = exp(a (M_r - M) + L_r - L): the slice's softmax
    # mass. The shares of all processes sum (reduce-scatter, in the backward) to the whole.
    mass = torch.exp((local_norm[:, 0] - norm[:, 0]) * a + local_norm[:, 1] - norm[:, 1]).unsqueeze(1)
    math_dtype = torch.promote_types(hidden_all.dtype, torch.float32)
    part = local_part.to(math_dtype).mul_(mass)
    if bool(owned.any()):
        label_rows = weight.index_select(0, local_labels.clamp(0, max(0, local_vocab - 1))).to(math_dtype)
        label_weight = (1 - mass) * owned.unsqueeze(1)
        if label_derivative is not None:
            label_weight = label_weight * (label_derivative.unsqueeze(1) if isinstance(label_derivative, Tensor)
                                           else label_derivative)
        part.addcmul_(label_rows, label_weight.to(math_dtype))
    return logp, norm, part.to(hidden_all.dtype)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2, weight, bias, labels1, run: _Run):
        logp, keep_idx, saved = _forward_all(hidden2, weight, bias, labels1, run)
        ctx.run = run
        ctx.hidden_shape = hidden2.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(keep_idx, *saved)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        run = ctx.run
        shard = run.shard
        if run.precompute_grad_hidden:
            keep_idx, part = ctx.saved_tensors
            grad_kept = grad_logp.index_select(0, keep_idx).to(torch.promote_types(part.dtype, torch.float32))
            grad_all = _all_gather_rows(grad_kept, run.counts, shard.group)
            scaled = (part.to(grad_all.dtype) * grad_all.unsqueeze(1)).to(part.dtype)
            mine = _reduce_scatter_rows(scaled, run.counts, shard.rank, shard.group)
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=part.dtype, device=part.device)
            grad_hidden.index_copy_(0, keep_idx, mine)
            return grad_hidden, None, None, None, None
        keep_idx, hidden_all, labels_all, norm_all, weight, bias = ctx.saved_tensors
        if not ctx.has_bias:
            bias = None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_kept = grad_logp.index_select(0, keep_idx).to(norm_all.dtype)
        grad_all = _all_gather_rows(grad_kept, run.counts, shard.group)
        # The backward runs where autocast may be on (CPU autocast, same thread): keep the dtype.
        with torch.autocast(hidden_all.device.type, enabled=False):
            columns = vocab_block_columns(run.column_budget, hidden_all.shape[0], hidden_all.dtype,
                                          weight.shape[0])
            grad_hidden_all, grad_weight, grad_bias = vocab_major_backward(
                grad_all, hidden_all, weight, bias, labels_all - shard.vocab_start, norm_all, run.backend,
                columns, (need_hidden, need_weight, need_bias and bias is not None), run.grad_filter,
                *run.transform)
        grad_hidden = None
        if need_hidden:
            if grad_hidden_all is None:  # no rows anywhere
                grad_hidden_all = hidden_all.new_zeros(hidden_all.shape)
            mine = _reduce_scatter_rows(grad_hidden_all, run.counts, shard.rank, shard.group)
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=hidden_all.dtype, device=hidden_all.device)
            grad_hidden.index_copy_(0, keep_idx, mine)
        if run.weight_grad_scale != 1.0:
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.mul_(run.weight_grad_scale)
        return grad_hidden, grad_weight, grad_bias, None, None


def _forward_all(hidden2, weight, bias, labels1, run: _Run):
    """Gather the kept tokens, compute, keep this process's rows: ``(logp [N], keep_idx, saved)``."""
    shard = run.shard
    keep_idx = (labels1 != run.ignore_index).nonzero().squeeze(1)
    hidden_kept = hidden2.index_select(0, keep_idx)
    labels_kept = labels1.index_select(0, keep_idx).to(torch.int64)
    hidden_all = _all_gather_rows(hidden_kept, run.counts, shard.group)
    labels_all = _all_gather_rows(labels_kept, run.counts, shard.group)
    logp_all, norm_all, part = _forward(hidden_all, labels_all, weight, bias, run)
    out_dtype = output_dtype(hidden2.dtype)
    logp = torch.zeros(labels1.shape[0], dtype=out_dtype, device=hidden2.device)
    mine = logp_all[run.offset : run.offset + run.counts[shard.rank]]
    logp.index_copy_(0, keep_idx, mine)
    if part is not None:  # the backward only scales this: nothing else stays alive
        return logp, keep_idx, (part,)
    # save_for_backward takes tensors only: an absent bias travels as an empty one.
    saved_bias = bias if bias is not None else hidden2.new_empty(0)
    return logp, keep_idx, (hidden_all, labels_all, norm_all, weight, saved_bias)


def vocab_parallel_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    mode: str = "default",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    grad_filter: float | None = None,
    backend: str = "auto",
    weight_grad_scale: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``token_logprobs(hidden @ W.T + b, labels)`` with ``W [V, H]`` split along V over ``group``.

    hidden ``[..., T, H]`` and labels ``[..., T]`` (global token ids, ``ignore_index`` where not
    scored): this process's own tokens. ``weight``: a DTensor ``[V, H]`` with placements
    ``(Shard(0),)`` on a 1-D mesh (``bias`` then a DTensor ``[V]`` sharded alike), or this process's
    rows ``[V_r, H]`` with ``vocab_start`` (its first row), ``vocab_size`` (V) and ``group`` (default:
    the default process group). Returns float32 ``[..., T]`` (float64 for float64 inputs), 0.0 where
    ignored, differentiable w.r.t. hidden, weight and bias.

    The weight (and bias) gradient of this process's rows is the sum over the tokens of *every*
    process, multiplied by ``weight_grad_scale`` (FSDP2 averages the gradients of its data-parallel
    ranks: the caller passes ``1 / divide factor`` to produce what FSDP's reduce-scatter would).
    ``mode``, ``chunk_size``, ``memory_budget`` (bytes of logits per chunk, over this process's
    slice), ``grad_filter``, ``backend``, ``logit_scale`` and ``softcap``: as for
    :func:`pyalign.linear_token_logprobs`.
    """
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if isinstance(weight_grad_scale, bool) or not isinstance(weight_grad_scale, (int, float)) or weight_grad_scale <= 0:
        raise ValueError(f"weight_grad_scale: expected a positive number, got {weight_grad_scale!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    shard, problem = resolve_shard(weight, bias, group, vocab_start, vocab_size)
    problem = problem or _local_problem(hidden, shard, labels, ignore_index, backend)
    wants_grad = False
    if not problem:
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, shard.weight, shard.bias))
        num_rows = labels.numel()
        hidden2 = hidden.reshape(num_rows, hidden.shape[-1])
        labels1 = labels.reshape(num_rows)
        keep = labels1 != ignore_index
        kept = int(keep.sum())
        try:  # the options' own checks (same on every process) and the backend
            plan = make_plan(hidden2, shard.weight, shard.bias, ignore_index=ignore_index, chunk_size=chunk_size,
                             memory_budget=memory_budget, mode=mode, grad_filter=grad_filter, backend=backend,
                             num_rows=max(1, num_rows), wants_grad=False, logit_scale=logit_scale,
                             softcap=softcap)
        except ValueError as err:
            problem = str(err)
    records = _exchange_meta(shard, hidden, kept if not problem else 0, wants_grad, problem)
    counts = [record["kept"] for record in records]
    total = sum(counts)
    budget = memory_budget if memory_budget is not None else DEFAULT_BUDGETS[mode]
    rows_per_chunk = chunk_size or rows_for_budget(budget, shard.weight.shape[0], hidden.dtype, max(1, total))
    frozen = not shard.weight.requires_grad and (shard.bias is None or not shard.bias.requires_grad)
    run = _Run(shard, counts, plan.backend, max(1, rows_per_chunk),
               rows_per_chunk * max(1, shard.weight.shape[0]) * hidden.element_size(), ignore_index,
               plan.grad_filter, float(weight_grad_scale),
               precompute_grad_hidden=(mode == "default" and wants_grad and hidden.requires_grad and frozen
                                       and plan.grad_filter is None),
               transform=plan.transform)
    with torch.autocast(hidden.device.type, enabled=False):
        if wants_grad:
            logp = _VocabParallelLogprobs.apply(hidden2, shard.weight, shard.bias, labels1, run)
        else:
            logp, _, _ = _forward_all(hidden2, shard.weight, shard.bias, labels1, run)
    return logp.view(labels.shape)
