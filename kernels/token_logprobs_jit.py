"""The @triton.jit code of the token log-prob op: the forward (online log-sum-exp), its split-V
merge and the backward, and their helpers. kernels/token_logprobs.py launches them and documents
the design; bench/NOTES_triton.md has the machine code they compile to on sm_90.
"""

import torch
import triton
import triton.language as tl

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
