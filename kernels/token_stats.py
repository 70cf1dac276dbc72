"""Triton kernel of the fused lm_head's per-token statistics (``return_stats=True``): one read of
a chunk of logits whose normaliser per row is already known (the forward kernel's ``norm``).

    triton_token_stats(logits2, norm, logit_scale=1.0, softcap=None)
        -> (entropy, mean_logits, log_sum_sq_probs, argmax)

logits2 ``[n, V]`` (fp32 / bf16 / fp16, unit stride along V), norm ``[n, 2]`` float32 (each row's
maximum M and log-sum L of the transformed logits z, pyalign/reference.py); outputs ``[n]`` float32
(argmax int64). With ``d = a (y - M) - L = log p`` per element: entropy = ``-sum p d``,
mean_logits = ``sum z / V``, log_sum_sq_probs = ``log sum p^2``, argmax = the first index of the
largest logit (the transforms are increasing). Knowing the normaliser makes this a plain sum (no
running rescale): one exp per element (and a tanh with a softcap). The torch path in ``pyalign/ops/linear_chunks.py`` computes the same in slices;
tests compare both with ``pyalign.reference.reference_token_stats``.
"""

import contextlib

import torch
import triton
import triton.language as tl

from pyalign.kernels.token_logprobs_jit import LOG2E, _exp2, _monotone, transform_args

_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _stats_kernel(logits_ptr, stride_row, norm_ptr, entropy_ptr, mean_ptr, lss_ptr, argmax_ptr, V,
                  a, cap_k, cap, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK_V)
    row_max = tl.load(norm_ptr + 2 * row)
    log_sum = tl.load(norm_ptr + 2 * row + 1)
    plogp = tl.zeros([BLOCK_V], tl.float32)  # sum p * log p, per lane
    psq = tl.zeros([BLOCK_V], tl.float32)    # sum p^2
    ysum = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_at = tl.full([BLOCK_V], _INT32_MAX, tl.int32)
    for v0 in tl.range(0, V, BLOCK_V, num_stages=2):
        v = v0 + lanes
        inside = v < V
        x = tl.load(row_ptr + v, mask=inside, other=float("-inf")).to(tl.float32)
        y = _monotone(x, cap_k, cap, SOFTCAP)
        log_p = (y - row_max) * a - log_sum
        p = tl.where(inside, _exp2(log_p * LOG2E), 0.0)
        # p = 0 (a -inf logit, or a lane past the row) adds nothing: 0 * -inf would be nan
        plogp += tl.where(p > 0, p * log_p, 0.0)
        psq += p * p
        ysum += tl.where(inside, y, 0.0)
        better = x > best  # strict: a lane keeps the first index of its largest value
        best_at = tl.where(better, v, best_at)
        best = tl.where(better, x, best)
    row_best = tl.max(best, axis=0)
    first = tl.min(tl.where(best == row_best, best_at, _INT32_MAX), axis=0)
    tl.store(entropy_ptr + row, -tl.sum(plogp, axis=0))
    tl.store(mean_ptr + row, tl.sum(ysum, axis=0) * a / V)
    tl.store(lss_ptr + row, tl.log(tl.sum(psq, axis=0)))
    tl.store(argmax_ptr + row, tl.where(first == _INT32_MAX, 0, first).to(tl.int64))


def triton_token_stats(logits2, norm, logit_scale=1.0, softcap=None):
    """(entropy, mean_logits, log_sum_sq_probs, argmax) per row of ``logits2`` (see module)."""
    if logits2.dim() != 2 or (logits2.shape[1] > 1 and logits2.stride(1) != 1):
        raise ValueError(f"logits2 must be [n, V] with unit stride along V, got {tuple(logits2.shape)}, "
                         f"strides {tuple(logits2.stride())}")
    rows, vocab = logits2.shape
    outputs = [torch.empty(rows, dtype=torch.float32, device=logits2.device) for _ in range(3)]
    argmax = torch.empty(rows, dtype=torch.int64, device=logits2.device)
    if rows == 0 or vocab == 0:
        return (*outputs, argmax.fill_(-1))
    block_v = max(16, min(4096, triton.next_power_of_2(vocab)))
    with torch.cuda.device(logits2.device) if logits2.is_cuda else contextlib.nullcontext():
        a, cap_k, cap, softcapped = transform_args(logit_scale, softcap)
        _stats_kernel[(rows,)](logits2, logits2.stride(0), norm.to(torch.float32).contiguous(), *outputs, argmax,
                               vocab, a, cap_k, cap, BLOCK_V=block_v, SOFTCAP=softcapped,
                               num_warps=8 if block_v >= 2048 else 4)
    return (*outputs, argmax)

