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

from pyalign.ops.token_logprobs import has_self_overlap

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32 (jit globals must be constexpr)
LOG2E = tl.constexpr(1.4426950408889634)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _probe():
    pass


# Triton decides when it decorates a function whether it runs on the CPU interpreter
# (TRITON_INTERPRET=1 at import time): ask a decorated function, not the environment.
_INTERPRET = not isinstance(_probe, triton.runtime.JITFunction)

if _INTERPRET:
    @triton.jit
    def _exp2(x):
        """2**x (numpy under the interpreter)."""
        return tl.exp2(x)
else:
    @triton.jit
    def _exp2(x):
        """2**x as one MUFU.EX2 with denormals flushed to zero. tl.exp / tl.exp2 compile to the
        non-FTZ ex2.approx.f32, which ptxas wraps in ~3 more instructions per element to scale
        denormal inputs; here every argument is <= 0 and a result below 2**-126 may as well be 0."""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _row_start(row, T, stride_b, stride_t):
    """Element offset (int64) of the first logit of flattened row `row` = b * T + t."""
    row = row.to(tl.int64)
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _online_update(m, s, x):
    """Fold one block `x` into the per-lane running max `m` and sum `s` of exp(x - m):
    x > m: s = s * exp(m - x) + 1, m = x;  otherwise: s = s + exp(x - m); both with
    e = exp(-|x - m|), one exp2 per element. `m` starts at -FLT_MAX, not -inf, so that x - m is
    never -inf - (-inf) = nan: a -inf logit (or a masked lane) gives e = 0 and leaves s unchanged."""
    e = _exp2(-tl.abs(x - m) * LOG2E)
    s = tl.where(x > m, s * e + 1.0, s + e)
    return tl.maximum(m, x), s


@triton.jit
def _merge_lanes(m, s):
    """Merge per-lane running maxima `m` and sums `s` (sum of exp(x - m)) into one (max, sum).

    Lanes that saw no finite logit have s == 0 and contribute nothing; a row of -inf gives
    (-FLT_MAX, 0), whose log-sum-exp is -inf, as torch gives.
    """
    row_max = tl.max(m, axis=0)
    return row_max, tl.sum(s * _exp2((m - row_max) * LOG2E), axis=0)


@triton.jit
def _body_and_edges(offset, v_begin, v_end, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Split the elements [v_begin, v_end) of a row starting at element `offset` into an aligned
    body [body_begin, body_begin + body_len) whose first element sits on a VEC-element (16-byte)
    boundary and whose length is a multiple of VEC, plus a head before it and a tail after it,
    each shorter than VEC. ALIGNED (the launcher proved every row starts aligned and V % 16 == 0):
    the body is everything."""
    if ALIGNED:
        head = v_begin * 0
        body_len = v_end - v_begin
    else:
        head = tl.minimum((VEC - (offset + v_begin) % VEC) % VEC, v_end - v_begin)
        body_len = tl.multiple_of((v_end - v_begin - head) // VEC * VEC, VEC)
    return v_begin + head, body_len, head


@triton.jit
def _edge_lanes(lanes, v_begin, head, body_end, v_end, VEC: tl.constexpr):
    """Vocabulary indices and mask of a row's head (lanes [0, VEC)) and tail (lanes [VEC, 2 VEC))
    in one block: at most 2 (VEC - 1) elements, read with scalar loads (they are not aligned)."""
    v = tl.where(lanes < VEC, v_begin + lanes, body_end + lanes - VEC)
    mask = ((lanes < VEC) & (lanes < head)) | ((lanes >= VEC) & (lanes < VEC + (v_end - body_end)))
    return v, mask


@triton.jit
def _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, V, row_max, row_sum):
    """Store lse and logp of one row, reading the label's logit by pointer.

    logp = (x_label - max) - log(sum) rather than x_label - lse: the subtraction of nearby large
    numbers happens first, exactly, as in torch's log_softmax. An ignored row (not `valid`) reads
    nothing and gets logp = lse = 0. A label outside [0, V) (not checked on the host for CUDA
    tensors: that would synchronise) reads nothing either and gets logp = NaN.
    """
    label_ok = (label >= 0) & (label < V)
    log_sum = tl.log(tl.where(valid, row_sum, 1.0))
    label_logit = tl.load(row_ptr + tl.where(valid & label_ok, label, 0), mask=valid & label_ok, other=0.0)
    label_logit = label_logit.to(tl.float32)
    logp = tl.where(label_ok, (label_logit - row_max) - log_sum, float("nan"))
    tl.store(lse_ptr + row, tl.where(valid, row_max + log_sum, 0.0))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))


@triton.jit
def _forward_kernel(
    logits_ptr, base_offset, labels_ptr, logp_ptr, lse_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index,
    BLOCK_V: tl.constexpr, SPLIT: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program (row, split): one read of logits[row, split*chunk_len : (split+1)*chunk_len].

    Each lane keeps its own running max and sum (:func:`_online_update`), so the loop needs one
    exp per element and no reduction (no barrier) until the end. The loads of the next block are
    issued before the current block is consumed (software prefetch in registers), so each thread
    has two blocks' loads in flight. Unaligned rows (V or a stride not a multiple of 16, e.g.
    V = 50257): a scalar head and tail around a 16-byte-aligned body. A row whose label is
    ignored reads nothing: its range is empty.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    offset = base_offset + _row_start(row, T, stride_b, stride_t)
    row_ptr = logits_ptr + offset
    lanes = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    v_begin = split * chunk_len
    v_end = tl.where(valid, tl.minimum(v_begin + chunk_len, V), v_begin)
    body_begin, body_len, head = _body_and_edges(offset, v_begin, v_end, VEC, ALIGNED)
    if not ALIGNED:
        v, edge = _edge_lanes(lanes, v_begin, head, body_begin + body_len, v_end, VEC)
        m, s = _online_update(m, s, tl.load(row_ptr + v, mask=edge, other=float("-inf")).to(tl.float32))
        body_ptr = logits_ptr + tl.multiple_of(offset + body_begin, VEC)
    else:
        body_ptr = row_ptr + body_begin
    for k in tl.range(0, body_len, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(body_ptr + k + lanes, mask=k + lanes < body_len, other=float("-inf")).to(tl.float32)
        m, s = _online_update(m, s, x)
    row_max, row_sum = _merge_lanes(m, s)

    if SPLIT:
        part = row.to(tl.int64) * num_splits + split
        tl.store(part_max_ptr + part, row_max)
        tl.store(part_sum_ptr + part, row_sum)
    else:
        _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, V, row_max, row_sum)


@triton.jit
def _forward_merge_kernel(
    logits_ptr, base_offset, labels_ptr, logp_ptr, lse_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, num_splits, ignore_index,
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
    row_ptr = logits_ptr + base_offset + _row_start(row, T, stride_b, stride_t)
    _finish_row(row_ptr, logp_ptr, lse_ptr, row, label, valid, V, row_max, row_sum)


@triton.jit
def _grad_block(x, v, label_lane, g, lse2, active):
    """g * (1[v == label] - exp(x - lse)), as -g * exp2(x log2e - lse log2e) plus g on the label;
    0 on ignored rows."""
    minus_g_p = -g * _exp2(x * LOG2E - lse2)
    grad = tl.where(v == label_lane, minus_g_p + g, minus_g_p)
    return tl.where(active, grad, 0.0)


@triton.jit
def _backward_kernel(
    logits_ptr, in_base, labels_ptr, lse_ptr, grad_ptr, grad_out_ptr, out_base,
    T, V, stride_b, stride_t, out_stride_b, out_stride_t, chunk_len, ignore_index,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, SAME_PHASE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program (row, split): grad_out = g * (1[v == label] - exp(x - lse)) over one chunk.

    Each element is loaded before it is stored by the same lane, and no lane touches another
    lane's elements, so grad_out may alias logits (the next block's loads, issued before the
    current block is stored, touch other elements). Ignored rows load nothing (masked loads move
    no memory) and store zeros. Unaligned rows: the body is aligned on the output's 16-byte
    boundaries; the input's loads are vectorized too when its rows have the same phase
    (SAME_PHASE: in place, or equal strides and offsets modulo 16 bytes).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    in_offset = in_base + _row_start(row, T, stride_b, stride_t)
    out_offset = out_base + _row_start(row, T, out_stride_b, out_stride_t)
    in_ptr = logits_ptr + in_offset
    out_ptr = grad_out_ptr + out_offset
    lanes = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    label_ok = (label >= 0) & (label < V)
    # compared with every int32 lane index: in [0, V) when active, and -1 never matches
    label_lane = tl.where(active & label_ok, label, -1).to(tl.int32)
    lse2 = tl.load(lse_ptr + row) * LOG2E
    g = tl.where(label_ok, tl.load(grad_ptr + row), float("nan"))  # a label outside [0, V): NaN row
    v_begin = split * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, V)
    body_begin, body_len, head = _body_and_edges(out_offset, v_begin, v_end, VEC, ALIGNED)
    read_len = tl.where(active, body_len, 0)  # ignored rows: every load masked off
    if not ALIGNED:
        v, edge = _edge_lanes(lanes, v_begin, head, body_begin + body_len, v_end, VEC)
        x = tl.load(in_ptr + v, mask=edge & (v < tl.where(active, v_end, 0)), other=0.0).to(tl.float32)
        grad = _grad_block(x, v, label_lane, g, lse2, active)
        tl.store(out_ptr + v, grad.to(grad_out_ptr.dtype.element_ty), mask=edge)
        out_body = grad_out_ptr + tl.multiple_of(out_offset + body_begin, VEC)
        if SAME_PHASE:
            in_body = logits_ptr + tl.multiple_of(in_offset + body_begin, VEC)
        else:
            in_body = in_ptr + body_begin
    else:
        out_body = out_ptr + body_begin
        in_body = in_ptr + body_begin
    for k in tl.range(0, body_len, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(in_body + k + lanes, mask=k + lanes < read_len, other=0.0).to(tl.float32)
        grad = _grad_block(x, body_begin + k + lanes, label_lane, g, lse2, active)
        tl.store(out_body + k + lanes, grad.to(grad_out_ptr.dtype.element_ty), mask=k + lanes < body_len)


# ---------------------------------------------------------------------------------------------
# Launch heuristics. One BLOCK_V / num_warps per vocabulary size (no autotuning: compile time
# matters and the op is memory-bound). BLOCK_V = 4096 with 8 warps gives each thread 16
# elements per iteration: two 16-byte loads for 16-bit logits, four for fp32.

_MAX_BLOCK_V = 4096
# Software pipelining of the body loops (tl.range num_stages: cp.async into shared memory): the
# next block's loads are in flight while the current one is used. 1 = plain loads.
NUM_STAGES = 3
_MAX_SPLITS = 256  # BLOCK_SPLITS of the merge kernel stays small


_MIN_BLOCK_V = 16  # the head + tail block of an unaligned row needs 2 x 8 lanes (16-bit logits)


def _block_v_and_warps(V):
    block_v = max(_MIN_BLOCK_V, min(_MAX_BLOCK_V, triton.next_power_of_2(V)))
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
    if block_v & (block_v - 1) or block_v < _MIN_BLOCK_V:
        raise ValueError(f"block_v must be a power of two >= {_MIN_BLOCK_V}, got {block_v}")
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


def _byte_extent(t):
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    first = t.storage_offset() * t.element_size()
    return first, first + (last + 1) * t.element_size() - 1


def _check_grad_out_memory(logits3, grad_out3):
    """One gradient element per logit: grad_out3 must not overlap itself (an expanded view would
    take several rows' gradients in one place), and must be logits3 itself (in place) or memory
    disjoint from it, as the C++ backends require (csrc/tensor_checks.h)."""
    if grad_out3.numel() == 0:
        return
    if has_self_overlap(grad_out3):
        raise ValueError(f"grad_out3 must not have elements that share memory (e.g. an expanded view), "
                         f"got strides {tuple(grad_out3.stride())}")
    if grad_out3.untyped_storage().data_ptr() != logits3.untyped_storage().data_ptr():
        return
    if grad_out3.storage_offset() == logits3.storage_offset() and grad_out3.stride() == logits3.stride():
        return
    out_first, out_last = _byte_extent(grad_out3)
    in_first, in_last = _byte_extent(logits3)
    if not (out_last < in_first or in_last < out_first):
        raise ValueError("grad_out3 must be logits3 itself (in-place backward) or memory disjoint from it, "
                         "got a partially overlapping view")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _launch_forward(logits3, labels2, ignore_index, num_splits=None, block_v=None,
                    num_warps=None, num_stages=None):
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
    aligned = _fully_aligned(logits3)
    base, offset, vec = (logits3, 0, _vec(logits3)) if aligned else _storage_base(logits3)
    with _on_device(logits3.device):
        _forward_kernel[(rows, num_splits)](
            base, offset, labels2, logp2, lse2, part_max, part_sum,
            T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index,
            BLOCK_V=block_v, SPLIT=split, VEC=vec, ALIGNED=aligned, NUM_STAGES=num_stages or NUM_STAGES,
            num_warps=num_warps,
        )
        if split:
            _forward_merge_kernel[(rows,)](
                base, offset, labels2, logp2, lse2, part_max, part_sum,
                T, V, stride_b, stride_t, num_splits, ignore_index,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=1,
            )
    return logp2, lse2


def _launch_backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3, num_splits=None,
                     block_v=None, num_warps=None, num_stages=None):
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
    _check_grad_out_memory(logits3, grad_out3)
    rows = B * T
    if rows == 0 or V == 0:
        return

    block_v, num_warps = _launch_config(V, block_v, num_warps)
    if num_splits is None:
        num_splits = _choose_splits(rows, V, block_v, device)
    chunk_len, num_splits = _chunk_len(V, num_splits, block_v)
    aligned = _fully_aligned(logits3) and _fully_aligned(grad_out3)
    if aligned:
        in_base, in_offset, out_base, out_offset = logits3, 0, grad_out3, 0
        vec, same_phase = _vec(logits3), True
    else:
        in_base, in_offset, in_vec = _storage_base(logits3)
        out_base, out_offset, vec = _storage_base(grad_out3)
        # The input's rows share the output's 16-byte phase: both bodies can be vector accesses.
        same_phase = in_vec == vec and all(
            (a - b) % vec == 0 for a, b in ((in_offset, out_offset), (logits3.stride(0), grad_out3.stride(0)),
                                            (logits3.stride(1), grad_out3.stride(1))))
    with _on_device(device):
        _backward_kernel[(rows, num_splits)](
            in_base, in_offset, labels2, lse2, grad2, out_base, out_offset,
            T, V, logits3.stride(0), logits3.stride(1),
            grad_out3.stride(0), grad_out3.stride(1), chunk_len, ignore_index,
            BLOCK_V=block_v, VEC=vec, ALIGNED=aligned, SAME_PHASE=same_phase,
            NUM_STAGES=num_stages or NUM_STAGES, num_warps=num_warps,
        )


def _vec(t):
    """Elements per 16 bytes (8 for 16-bit logits, 4 for fp32): the vector width of the loads."""
    return 16 // t.element_size()


def _fully_aligned(t):
    """Whether Triton's own specialization (pointers and integer arguments divisible by 16) already
    proves every row 16-byte aligned with V % 16 == 0: then the kernels need no head or tail."""
    return (t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0
            and t.shape[2] % 16 == 0)


def _storage_base(t):
    """(a tensor starting at t's storage base, t's element offset from it, the vector width the
    kernels may assume). Rows are located from the storage base, whose 16-byte alignment is what
    the aligned bodies rely on; a base that is not aligned (a foreign pointer) gets width 1: no
    alignment assumed, every load scalar."""
    base = t.as_strided((1,), (1,), 0)
    vec = _vec(t) if t.untyped_storage().data_ptr() % 16 == 0 else 1
    return base, t.storage_offset(), vec


def _on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_forward(logits3, labels2, ignore_index):
    """(logp2, lse2), float32 [B, T]: log p(label) (0 where ignored) and each row's log-sum-exp."""
    return _launch_forward(logits3, labels2, int(ignore_index))


def triton_backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3):
    """Write d(sum grad2 * logp2)/d logits3 into grad_out3 (which may be logits3 itself)."""
    _launch_backward(logits3, labels2, lse2, grad2, int(ignore_index), grad_out3)
