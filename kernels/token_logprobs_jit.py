"""The @triton.jit code of the token log-prob op: the forward (online maximum and sum of
exponentials), its split-V merge and the backward, and their helpers. kernels/token_logprobs.py
launches them and documents the design; bench/NOTES_triton.md has the machine code they compile to
on sm_90.

Logit transforms (pyalign/reference.py): rows are normalised through y (the logits, or with
SOFTCAP the soft-capped logits ``cap * tanh(cap_k * x)``, ``cap_k = logit_scale / cap``) with
``z - z' = a (y - y')``; each row's result is the pair (M, L) = (max y, log sum exp(a (y - M))),
never one log-sum-exp, and ``y - M`` is formed before anything multiplies it, so any finite offset
of a row stays exact.
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


def transform_args(logit_scale, softcap):
    """(a, cap_k, cap, SOFTCAP) of the kernels: y = x, a = logit_scale without a softcap; else
    y = cap * tanh(cap_k * x), cap_k = logit_scale / softcap, a = 1."""
    logit_scale = float(logit_scale)
    if not (logit_scale > 0 and logit_scale != float("inf")):
        raise ValueError(f"logit_scale: expected a finite positive float, got {logit_scale!r}")
    if softcap is None:
        return logit_scale, 0.0, 0.0, False
    softcap = float(softcap)
    if not (softcap > 0 and softcap != float("inf")):
        raise ValueError(f"softcap: expected None or a finite positive float, got {softcap!r}")
    return 1.0, logit_scale / softcap, softcap, True


@triton.jit
def _tanh(u):
    """tanh(u) from one exp2: (1 - e) / (1 + e), e = 2^(-2 |u| log2 e), with u's sign; below
    |u| = 0.25, where 1 - e would cancel, the odd Taylor polynomial to u^11 (error < 1e-9
    relative). The same code on the GPU and under the interpreter (which has no tanh)."""
    au = tl.abs(u)
    e = _exp2(au * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    us = tl.minimum(au, 0.25)  # the branch not taken stays finite
    u2 = us * us
    small = us * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (
        -0.05396825396825397 + u2 * (0.021869488536155203 + u2 * -0.008863235529902197)))))
    t = tl.where(au < 0.25, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _monotone(x, cap_k, cap, SOFTCAP: tl.constexpr):
    """y of the logits x: x itself, or cap * tanh(cap_k * x)."""
    if SOFTCAP:
        return cap * _tanh(x * cap_k)
    return x


@triton.jit
def _row_start(row, T, stride_b, stride_t):
    """Element offset (int64) of the first logit of flattened row `row` = b * T + t."""
    row = row.to(tl.int64)
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _online_update(m, s, y, a_log2e):
    """Fold one block `y` into the per-lane running max `m` and sum `s` of exp(a (y - m)):
    y > m: s = s * exp(a (m - y)) + 1, m = y;  otherwise: s = s + exp(a (y - m)); both with
    e = exp(-a |y - m|), one exp2 per element. `m` starts at -FLT_MAX, not -inf, so that y - m is
    never -inf - (-inf) = nan: a -inf logit (or a masked lane) gives e = 0 and leaves s unchanged."""
    e = _exp2(-tl.abs(y - m) * a_log2e)
    s = tl.where(y > m, s * e + 1.0, s + e)
    return tl.maximum(m, y), s


@triton.jit
def _masked_y(x, mask, cap_k, cap, SOFTCAP: tl.constexpr):
    """y of loaded logits whose masked lanes hold -inf; with SOFTCAP those lanes stay -inf (a
    real -inf logit maps to -cap and counts)."""
    if SOFTCAP:
        return tl.where(mask, _monotone(x, cap_k, cap, SOFTCAP), float("-inf"))
    return x


@triton.jit
def _merge_lanes(m, s, a_log2e):
    """Merge per-lane running maxima `m` and sums `s` (sum of exp(a (y - m))) into one (max, sum).

    Lanes that saw no finite y have s == 0 and contribute nothing; a row of -inf gives
    (-FLT_MAX, 0), whose log-sum is -inf and log-probs NaN, as torch gives.
    """
    row_max = tl.max(m, axis=0)
    return row_max, tl.sum(s * _exp2((m - row_max) * a_log2e), axis=0)


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
def _finish_row(row_ptr, logp_ptr, norm_ptr, row, label, valid, V, row_max, row_sum, a, cap_k, cap,
                SOFTCAP: tl.constexpr):
    """Store the normaliser (M, L) and logp of one row, reading the label's logit by pointer.

    logp = a (y_label - M) - L: the subtraction of nearby large numbers happens first, exactly,
    and M + L is never formed (it would round L away at large offsets). An ignored row (not
    `valid`) reads nothing and gets logp = M = L = 0. A label outside [0, V) (not checked on the
    host for CUDA tensors: that would synchronise) reads nothing either and gets logp = NaN.
    """
    label_ok = (label >= 0) & (label < V)
    log_sum = tl.log(tl.where(valid, row_sum, 1.0))
    label_logit = tl.load(row_ptr + tl.where(valid & label_ok, label, 0), mask=valid & label_ok, other=0.0)
    label_y = _monotone(label_logit.to(tl.float32), cap_k, cap, SOFTCAP)
    logp = tl.where(label_ok, (label_y - row_max) * a - log_sum, float("nan"))
    norm_at = norm_ptr + row.to(tl.int64) * 2
    tl.store(norm_at, tl.where(valid, row_max, 0.0))
    tl.store(norm_at + 1, tl.where(valid, log_sum, 0.0))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))


@triton.jit
def _forward_kernel(
    logits_ptr, base_offset, labels_ptr, logp_ptr, norm_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index, a, cap_k, cap,
    BLOCK_V: tl.constexpr, SPLIT: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_STAGES: tl.constexpr, SOFTCAP: tl.constexpr,
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
    a_log2e = a * LOG2E

    m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    v_begin = split * chunk_len
    v_end = tl.where(valid, tl.minimum(v_begin + chunk_len, V), v_begin)
    body_begin, body_len, head = _body_and_edges(offset, v_begin, v_end, VEC, ALIGNED)
    if not ALIGNED:
        v, edge = _edge_lanes(lanes, v_begin, head, body_begin + body_len, v_end, VEC)
        x = tl.load(row_ptr + v, mask=edge, other=float("-inf")).to(tl.float32)
        m, s = _online_update(m, s, _masked_y(x, edge, cap_k, cap, SOFTCAP), a_log2e)
        body_ptr = logits_ptr + tl.multiple_of(offset + body_begin, VEC)
    else:
        body_ptr = row_ptr + body_begin
    for k in tl.range(0, body_len, BLOCK_V, num_stages=NUM_STAGES):
        inside = k + lanes < body_len
        x = tl.load(body_ptr + k + lanes, mask=inside, other=float("-inf")).to(tl.float32)
        m, s = _online_update(m, s, _masked_y(x, inside, cap_k, cap, SOFTCAP), a_log2e)
    row_max, row_sum = _merge_lanes(m, s, a_log2e)

    if SPLIT:
        part = row.to(tl.int64) * num_splits + split
        tl.store(part_max_ptr + part, row_max)
        tl.store(part_sum_ptr + part, row_sum)
    else:
        _finish_row(row_ptr, logp_ptr, norm_ptr, row, label, valid, V, row_max, row_sum, a, cap_k, cap, SOFTCAP)


@triton.jit
def _forward_merge_kernel(
    logits_ptr, base_offset, labels_ptr, logp_ptr, norm_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, num_splits, ignore_index, a, cap_k, cap,
    BLOCK_SPLITS: tl.constexpr, SOFTCAP: tl.constexpr,
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
    row_max, row_sum = _merge_lanes(m, s, a * LOG2E)
    row_ptr = logits_ptr + base_offset + _row_start(row, T, stride_b, stride_t)
    _finish_row(row_ptr, logp_ptr, norm_ptr, row, label, valid, V, row_max, row_sum, a, cap_k, cap, SOFTCAP)


@triton.jit
def _grad_block(x, v, label_lane, g, row_max, log_sum2, a_log2e, cap_k, cap, active, SOFTCAP: tl.constexpr):
    """g * (1[v == label] - p) * dz/dx with p = exp2((y - M) a log2e - L log2e), as -g p plus g on
    the label (g already carries logit_scale); with SOFTCAP times 1 - tanh^2. 0 on ignored rows."""
    if SOFTCAP:
        t = _tanh(x * cap_k)
        minus_g_p = -g * _exp2((cap * t - row_max) * a_log2e - log_sum2)
    else:
        minus_g_p = -g * _exp2((x - row_max) * a_log2e - log_sum2)
    grad = tl.where(v == label_lane, minus_g_p + g, minus_g_p)
    if SOFTCAP:
        grad = grad * (1.0 - t * t)
    return tl.where(active, grad, 0.0)


@triton.jit
def _backward_kernel(
    logits_ptr, in_base, labels_ptr, norm_ptr, grad_ptr, grad_out_ptr, out_base,
    T, V, stride_b, stride_t, out_stride_b, out_stride_t, chunk_len, ignore_index, a, cap_k, cap,
    grad_scale,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, SAME_PHASE: tl.constexpr,
    NUM_STAGES: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Program (row, split): grad_out = g * (1[v == label] - softmax(z)) * dz/dx over one chunk.

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
    a_log2e = a * LOG2E
    row_max = tl.load(norm_ptr + row.to(tl.int64) * 2)
    log_sum2 = tl.load(norm_ptr + row.to(tl.int64) * 2 + 1) * LOG2E
    # dz/dx's constant factor logit_scale rides on g; a label outside [0, V): a NaN row.
    g = tl.where(label_ok, tl.load(grad_ptr + row) * grad_scale, float("nan"))
    v_begin = split * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, V)
    body_begin, body_len, head = _body_and_edges(out_offset, v_begin, v_end, VEC, ALIGNED)
    read_len = tl.where(active, body_len, 0)  # ignored rows: every load masked off
    if not ALIGNED:
        v, edge = _edge_lanes(lanes, v_begin, head, body_begin + body_len, v_end, VEC)
        x = tl.load(in_ptr + v, mask=edge & (v < tl.where(active, v_end, 0)), other=0.0).to(tl.float32)
        grad = _grad_block(x, v, label_lane, g, row_max, log_sum2, a_log2e, cap_k, cap, active, SOFTCAP)
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
        grad = _grad_block(x, body_begin + k + lanes, label_lane, g, row_max, log_sum2, a_log2e, cap_k, cap,
                           active, SOFTCAP)
        tl.store(out_body + k + lanes, grad.to(grad_out_ptr.dtype.element_ty), mask=k + lanes < body_len)
