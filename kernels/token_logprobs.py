"""Triton kernels of the fused token log-prob op (log-softmax + gather of the label).

Backend contract (docs/DESIGN.md):

    triton_forward(logits3, labels2, ignore_index) -> (logp2, lse2)
    triton_backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3) -> None

Traffic: the forward reads every logit once (online max / sum-exp, the label's logit fetched by
pointer in the same program); the backward reads every logit once and writes the gradient once,
elementwise, so that it may write into the logits' own storage (in-place backward). Rows whose
label is `ignore_index` are read by neither: the forward writes logp = lse = 0 for them (lse is
unspecified there by the contract) and the backward writes zeros.

Layout: one program per (row, vocabulary split). With many rows there is one split per row and
the forward writes lse/logp directly. With few rows and a large vocabulary (a handful of long
rows cannot fill the GPU) the vocabulary is split: each program writes a partial (max, sum-exp)
pair and a tiny merge kernel finishes the rows; the backward is elementwise and needs no merge.

Offsets: a row starts at `b * stride_b + t * stride_t`, computed in int64 (N * V exceeds 2**31 at
8 x 4096 x 152064, and strides are arbitrary, e.g. `logits[:, :-1]`); offsets within a row stay
below V < 2**31.
"""

import contextlib

import torch
import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32 (jit globals must be constexpr)

# tl.exp on float32 compiles to a multiply by log2(e) and the ex2.approx instruction (one MUFU op
# per element), the same as a hand-written exp2; under the interpreter it is numpy's exp, which
# underflows to 0 silently where a hand-scaled argument would overflow first and warn.

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_start(row, T, stride_b, stride_t):
    """Element offset (int64) of the first logit of flattened row `row` = b * T + t."""
    row = row.to(tl.int64)
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _merge_lanes(m, s):
    """Merge per-lane running maxima `m` and sums `s` (sum of exp(x - m)) into one (max, sum).

    Lanes that saw no finite logit have s == 0 and contribute nothing; a row of -inf gives
    (-FLT_MAX, 0), whose log-sum-exp is -inf, as torch gives.
    """
    row_max = tl.max(m, axis=0)
    return row_max, tl.sum(s * tl.exp(m - row_max), axis=0)


@triton.jit
def _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, row_max, row_sum):
    """Store lse and logp of one row, reading the label's logit by pointer.

    logp = (x_label - max) - log(sum) rather than x_label - lse: the subtraction of nearby large
    numbers happens first, exactly, as in torch's log_softmax. An ignored row (not `valid`) reads
    nothing and gets logp = lse = 0.
    """
    log_sum = tl.log(tl.where(valid, row_sum, 1.0))
    label_logit = tl.load(row_ptr + tl.where(valid, label, 0), mask=valid, other=0.0)
    label_logit = label_logit.to(tl.float32)
    tl.store(lse_ptr + row, tl.where(valid, row_max + log_sum, 0.0))
    tl.store(logp_ptr + row, tl.where(valid, (label_logit - row_max) - log_sum, 0.0))


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index,
    BLOCK_V: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (row, split): one read of logits[row, split*chunk_len : (split+1)*chunk_len].

    Each lane keeps its own running max `m` and sum `s` of exp(x - m), so the loop needs one
    exp per element and no reduction (no barrier) until the end: for a new element x,
    x > m: s = s * exp(m - x) + 1, m = x;  otherwise: s = s + exp(x - m);
    both cases use e = exp(-|x - m|). `m` starts at -FLT_MAX, not -inf, so that x - m is never
    -inf - (-inf) = nan: a -inf logit (or the masked tail) gives e = 0 and leaves s unchanged.
    A row whose label is ignored runs no iteration: its chunk is empty.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    lanes = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    v_begin = split * chunk_len
    v_end = tl.where(valid, tl.minimum(v_begin + chunk_len, V), v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
        v = v0 + lanes
        x = tl.load(row_ptr + v, mask=v < v_end, other=float("-inf")).to(tl.float32)
        e = tl.exp(-tl.abs(x - m))
        s = tl.where(x > m, s * e + 1.0, s + e)
        m = tl.maximum(m, x)
    row_max, row_sum = _merge_lanes(m, s)

    if SPLIT:
        part = row.to(tl.int64) * num_splits + split
        tl.store(part_max_ptr + part, row_max)
        tl.store(part_sum_ptr + part, row_sum)
    else:
        _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, row_max, row_sum)


@triton.jit
def _forward_merge_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, part_max_ptr, part_sum_ptr,
    T, stride_b, stride_t, num_splits, ignore_index,
    BLOCK_SPLITS: tl.constexpr,
):
    """Program per row: merge the row's partial (max, sum) pairs, gather the label's logit.
    An ignored row reads neither its partials nor its logits."""
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    splits = tl.arange(0, BLOCK_SPLITS)
    part = row.to(tl.int64) * num_splits + splits
    in_row = splits < tl.where(valid, num_splits, 0)  # ignored rows: every load masked off
    m = tl.load(part_max_ptr + part, mask=in_row, other=-FLT_MAX)
    s = tl.load(part_sum_ptr + part, mask=in_row, other=0.0)
    row_max, row_sum = _merge_lanes(m, s)
    row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, row_max, row_sum)


@triton.jit
def _backward_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_ptr, grad_out_ptr,
    T, V, stride_b, stride_t, out_stride_b, out_stride_t, chunk_len, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Program (row, split): grad_out = g * (1[v == label] - exp(x - lse)) over one chunk.

    Each element is loaded before it is stored by the same lane, and no lane touches another
    lane's elements, so grad_out may alias logits. Ignored rows load nothing (masked loads move
    no memory) and store zeros.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    in_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    out_ptr = grad_out_ptr + _row_start(row, T, out_stride_b, out_stride_t)
    lanes = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    # compared with every int32 lane index: in [0, V) when active, and -1 never matches
    label_lane = tl.where(active, label, -1).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    v_begin = split * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, V)
    read_end = tl.where(active, v_end, 0)  # ignored rows: every load masked off
    for v0 in range(v_begin, v_end, BLOCK_V):
        v = v0 + lanes
        in_row = v < v_end
        x = tl.load(in_ptr + v, mask=v < read_end, other=0.0).to(tl.float32)
        minus_g_p = -g * tl.exp(x - lse)
        grad = tl.where(v == label_lane, minus_g_p + g, minus_g_p)
        grad = tl.where(active, grad, 0.0)
        tl.store(out_ptr + v, grad.to(grad_out_ptr.dtype.element_ty), mask=in_row)


# Triton decided when it decorated the kernels whether they run on the CPU interpreter
# (TRITON_INTERPRET=1 at import time): the wrapper asks the kernel object, not the environment.
_INTERPRET = not isinstance(_forward_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------------------------------
# Launch heuristics. One BLOCK_V / num_warps per vocabulary size (no autotuning: compile time
# matters and the op is memory-bound). BLOCK_V = 4096 with 8 warps gives each thread 16
# elements per iteration: two 16-byte loads for 16-bit logits, four for fp32.

_MAX_BLOCK_V = 4096
_MAX_SPLITS = 256  # BLOCK_SPLITS of the merge kernel stays small


def _block_v_and_warps(V):
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    if block_v >= 2048:
        num_warps = 8
    elif block_v >= 512:
        num_warps = 4
    else:
        num_warps = 1
    return block_v, num_warps


def _launch_config(V, block_v, num_warps):
    default_block_v, default_warps = _block_v_and_warps(V)
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, num_warps or default_warps


def _target_programs(device):
    """Programs wanted in flight to fill the device: a few per multiprocessor."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: programs run one after another, splitting buys nothing


def _choose_splits(rows, V, block_v, device):
    """Vocabulary splits per row so that rows * splits reaches the device's target."""
    if rows >= _target_programs(device):
        return 1
    wanted = triton.cdiv(_target_programs(device), rows)
    return max(1, min(wanted, triton.cdiv(V, block_v), _MAX_SPLITS))


def _chunk_len(V, num_splits, block_v):
    """Length of each split, a multiple of BLOCK_V; returns (chunk_len, actual splits)."""
    chunk_len = triton.cdiv(triton.cdiv(V, num_splits), block_v) * block_v
    return chunk_len, triton.cdiv(V, chunk_len)


# ---------------------------------------------------------------------------------------------
# Contract checks: cheap (shapes, dtypes, strides, devices), no data-dependent work.

def _check_logits(name, logits3):
    if not isinstance(logits3, torch.Tensor) or logits3.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor [B, T, V], got {_describe(logits3)}")
    if logits3.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for the triton backend, "
                         f"got {logits3.dtype}")
    if logits3.shape[2] > 1 and logits3.stride(2) != 1:
        raise ValueError(f"{name} must have stride(2) == 1 (contiguous vocabulary), "
                         f"got strides {tuple(logits3.stride())}")
    if _INTERPRET:
        if logits3.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor under TRITON_INTERPRET=1, "
                             f"got device {logits3.device}")
    elif logits3.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend (set "
                         f"TRITON_INTERPRET=1 before importing triton to run on the CPU), "
                         f"got device {logits3.device}")


def _check_rows(name, tensor, shape, dtype, device):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} like logits3, got {tensor.device}")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _launch_forward(logits3, labels2, ignore_index, num_splits=None, block_v=None,
                    num_warps=None):
    """Forward; the keyword arguments override the heuristics (tests and tuning sweeps)."""
    _check_logits("logits3", logits3)
    B, T, V = logits3.shape
    _check_rows("labels2", labels2, (B, T), torch.int64, logits3.device)
    rows = B * T
    logp2 = torch.empty((B, T), dtype=torch.float32, device=logits3.device)
    lse2 = torch.empty((B, T), dtype=torch.float32, device=logits3.device)
    if rows == 0:
        return logp2, lse2
    if V == 0:  # every label must then be ignored (the dispatcher checks labels)
        return logp2.zero_(), lse2.fill_(float("-inf"))

    block_v, num_warps = _launch_config(V, block_v, num_warps)
    if num_splits is None:
        num_splits = _choose_splits(rows, V, block_v, logits3.device)
    chunk_len, num_splits = _chunk_len(V, num_splits, block_v)
    split = num_splits > 1
    if split:
        part_max = torch.empty((rows, num_splits), dtype=torch.float32, device=logits3.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_max = part_sum = lse2  # not touched when SPLIT is False
    stride_b, stride_t = logits3.stride(0), logits3.stride(1)
    with _on_device(logits3.device):
        _forward_kernel[(rows, num_splits)](
            logits3, labels2, logp2, lse2, part_max, part_sum,
            T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index,
            BLOCK_V=block_v, SPLIT=split, num_warps=num_warps,
        )
        if split:
            _forward_merge_kernel[(rows,)](
                logits3, labels2, logp2, lse2, part_max, part_sum,
                T, stride_b, stride_t, num_splits, ignore_index,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=1,
            )
    return logp2, lse2


def _launch_backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3, num_splits=None,
                     block_v=None, num_warps=None):
    """Backward; the keyword arguments override the heuristics (tests and tuning sweeps)."""
    _check_logits("logits3", logits3)
    B, T, V = logits3.shape
    device = logits3.device
    _check_rows("labels2", labels2, (B, T), torch.int64, device)
    _check_rows("lse2", lse2, (B, T), torch.float32, device)
    _check_rows("grad2", grad2, (B, T), torch.float32, device)
    _check_logits("grad_out3", grad_out3)
    if grad_out3.shape != logits3.shape or grad_out3.dtype != logits3.dtype:
        raise ValueError(f"grad_out3 must match logits3 in shape and dtype "
                         f"({tuple(logits3.shape)}, {logits3.dtype}), got "
                         f"({tuple(grad_out3.shape)}, {grad_out3.dtype})")
    if grad_out3.device != device:
        raise ValueError(f"grad_out3 must be on {device} like logits3, got {grad_out3.device}")
    rows = B * T
    if rows == 0 or V == 0:
        return

    block_v, num_warps = _launch_config(V, block_v, num_warps)
    if num_splits is None:
        num_splits = _choose_splits(rows, V, block_v, device)
    chunk_len, num_splits = _chunk_len(V, num_splits, block_v)
    with _on_device(device):
        _backward_kernel[(rows, num_splits)](
            logits3, labels2, lse2, grad2, grad_out3,
            T, V, logits3.stride(0), logits3.stride(1),
            grad_out3.stride(0), grad_out3.stride(1), chunk_len, ignore_index,
            BLOCK_V=block_v, num_warps=num_warps,
        )


def _on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_forward(logits3, labels2, ignore_index):
    """(logp2, lse2), float32 [B, T]: log p(label) (0 where ignored) and each row's log-sum-exp."""
    return _launch_forward(logits3, labels2, int(ignore_index))


def triton_backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3):
    """Write d(sum grad2 * logp2)/d logits3 into grad_out3 (which may be logits3 itself)."""
    _launch_backward(logits3, labels2, lse2, grad2, int(ignore_index), grad_out3)
