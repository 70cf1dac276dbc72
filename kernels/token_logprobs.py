"""Triton kernels of the fused token log-prob op (log-softmax + gather of the label).

Backend contract (docs/DESIGN.md):

    triton_forward(logits3, labels2, ignore_index, logit_scale=1.0, softcap=None) -> (logp2, norm2)
    triton_backward(logits3, labels2, norm2, grad2, ignore_index, grad_out3, logit_scale=1.0,
                    softcap=None) -> None

norm2 [B, T, 2] holds each row's (maximum, log-sum) of the transformed logits (pyalign/reference.py).

Traffic: the forward reads every logit once (online max / sum-exp, the label's logit fetched by
pointer in the same program); the backward reads every logit once and writes the gradient once,
elementwise, so that it may write into the logits' own storage (in-place backward). Rows whose
label is `ignore_index` are read by neither: the forward writes logp = norm = 0 for them (norm is
unspecified there by the contract) and the backward writes zeros. The logit transform is applied
in registers: with a softcap, one tanh (one more exp2) per element each way.

Layout: one program per (row, vocabulary split). With many rows there is one split per row and
the forward writes norm/logp directly. With few rows and a large vocabulary (a handful of long
rows cannot fill the GPU) the vocabulary is split: each program writes a partial (max, sum-exp)
pair and a tiny merge kernel finishes the rows; the backward is elementwise and needs no merge.

Offsets: a row starts at `b * stride_b + t * stride_t`, computed in int64 (N * V exceeds 2**31 at
8 x 4096 x 152064, and strides are arbitrary, e.g. `logits[:, :-1]`); offsets within a row stay
below V < 2**31.
"""


import contextlib

import torch
import triton

from pyalign.kernels.token_logprobs_jit import (  # noqa: F401  (re-exported for tests and token_stats)
    FLT_MAX,
    LOG2E,
    _FLOAT_DTYPES,
    _INTERPRET,
    _backward_kernel,
    _exp2,
    _forward_kernel,
    _forward_merge_kernel,
    transform_args,
)
from pyalign.tensor_checks import has_self_overlap


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


def _launch_forward(logits3, labels2, ignore_index, logit_scale=1.0, softcap=None, num_splits=None,
                    block_v=None, num_warps=None, num_stages=None):
    """Forward; the keyword arguments after softcap override the heuristics (tests and tuning)."""
    _check_logits("logits3", logits3)
    B, T, V = logits3.shape
    _check_rows("labels2", labels2, (B, T), torch.int64, logits3.device)
    a, cap_k, cap, softcapped = transform_args(logit_scale, softcap)
    rows = B * T
    logp2 = torch.empty((B, T), dtype=torch.float32, device=logits3.device)
    norm2 = torch.empty((B, T, 2), dtype=torch.float32, device=logits3.device)
    if rows == 0:
        return logp2, norm2
    if V == 0:  # every label must then be ignored (the dispatcher checks labels)
        return logp2.zero_(), norm2.fill_(float("-inf"))

    block_v, num_warps = _launch_config(V, block_v, num_warps)
    if num_splits is None:
        num_splits = _choose_splits(rows, V, block_v, logits3.device)
    chunk_len, num_splits = _chunk_len(V, num_splits, block_v)
    split = num_splits > 1
    if split:
        part_max = torch.empty((rows, num_splits), dtype=torch.float32, device=logits3.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_max = part_sum = norm2  # not touched when SPLIT is False
    stride_b, stride_t = logits3.stride(0), logits3.stride(1)
    aligned = _fully_aligned(logits3)
    base, offset, vec = (logits3, 0, _vec(logits3)) if aligned else _storage_base(logits3)
    with _on_device(logits3.device):
        _forward_kernel[(rows, num_splits)](
            base, offset, labels2, logp2, norm2, part_max, part_sum,
            T, V, stride_b, stride_t, chunk_len, num_splits, ignore_index, a, cap_k, cap,
            BLOCK_V=block_v, SPLIT=split, VEC=vec, ALIGNED=aligned, NUM_STAGES=num_stages or NUM_STAGES,
            SOFTCAP=softcapped, num_warps=num_warps,
        )
        if split:
            _forward_merge_kernel[(rows,)](
                base, offset, labels2, logp2, norm2, part_max, part_sum,
                T, V, stride_b, stride_t, num_splits, ignore_index, a, cap_k, cap,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), SOFTCAP=softcapped, num_warps=1,
            )
    return logp2, norm2


def _launch_backward(logits3, labels2, norm2, grad2, ignore_index, grad_out3, logit_scale=1.0, softcap=None,
                     num_splits=None, block_v=None, num_warps=None, num_stages=None):
    """Backward; the keyword arguments after softcap override the heuristics (tests and tuning)."""
    _check_logits("logits3", logits3)
    B, T, V = logits3.shape
    device = logits3.device
    _check_rows("labels2", labels2, (B, T), torch.int64, device)
    _check_rows("norm2", norm2, (B, T, 2), torch.float32, device)
    _check_rows("grad2", grad2, (B, T), torch.float32, device)
    _check_logits("grad_out3", grad_out3)
    a, cap_k, cap, softcapped = transform_args(logit_scale, softcap)
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
            (first - second) % vec == 0 for first, second in ((in_offset, out_offset), (logits3.stride(0), grad_out3.stride(0)),
                                            (logits3.stride(1), grad_out3.stride(1))))
    with _on_device(device):
        _backward_kernel[(rows, num_splits)](
            in_base, in_offset, labels2, norm2, grad2, out_base, out_offset,
            T, V, logits3.stride(0), logits3.stride(1),
            grad_out3.stride(0), grad_out3.stride(1), chunk_len, ignore_index, a, cap_k, cap,
            float(logit_scale),
            BLOCK_V=block_v, VEC=vec, ALIGNED=aligned, SAME_PHASE=same_phase,
            NUM_STAGES=num_stages or NUM_STAGES, SOFTCAP=softcapped, num_warps=num_warps,
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


def triton_forward(logits3, labels2, ignore_index, logit_scale=1.0, softcap=None):
    """(logp2 [B, T], norm2 [B, T, 2]), float32: log p(label) (0 where ignored) and each row's
    (maximum, log-sum) of the transformed logits."""
    return _launch_forward(logits3, labels2, int(ignore_index), logit_scale, softcap)


def triton_backward(logits3, labels2, norm2, grad2, ignore_index, grad_out3, logit_scale=1.0, softcap=None):
    """Write d(sum grad2 * logp2)/d logits3 into grad_out3 (which may be logits3 itself)."""
    _launch_backward(logits3, labels2, norm2, grad2, int(ignore_index), grad_out3, logit_scale, softcap)
