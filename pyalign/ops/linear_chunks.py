"""Building blocks of the fused lm_head paths (``linear_token_logprobs``, ``linear_preference_loss``):
chunk sizes, the chunk matmul, the approximate gradient filter's vocabulary runs, weight-gradient
accumulation, and the per-token statistics computed from a chunk of logits.

docs/fused_linear.md has the formulas, the memory accounting and why each choice was made.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pyalign.reference import exponent_scale, normalised_logprobs, transform_derivative

MIB = 1 << 20
FILTER_BLOCK = 2048  # vocabulary columns per gradient-filter decision
_ACCUMULATE_TEMP_BYTES = 32 * MIB  # bound on the half-precision product when fp32-accumulating
_STATS_TEMP_BYTES = 32 * MIB  # bound on each float temporary of the per-token statistics



def rows_for_budget(budget_bytes: int, vocab: int, dtype: torch.dtype, total_rows: int) -> int:
    """Largest number of logits rows ``[rows, vocab]`` of ``dtype`` within ``budget_bytes``
    (at least 1, at most ``total_rows``), rounded down to a multiple of 64 for the matmuls."""
    row_bytes = max(1, vocab) * torch.empty((), dtype=dtype).element_size()
    rows = max(1, budget_bytes // row_bytes)
    if rows >= total_rows:
        return max(1, total_rows)
    return rows - rows % 64 if rows > 64 else rows


def linear_into(out: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out <- hidden_rows @ weight.T (+ bias)`` in the input dtype, written into ``out``."""
    if bias is None:
        return torch.mm(hidden_rows, weight.t(), out=out)
    return torch.addmm(bias, hidden_rows, weight.t(), out=out)


def kept_vocab_runs(d_logits: Tensor, grad_filter: float | None, limit_scale: float) -> list[tuple[int, int]]:
    """Vocabulary ranges ``[start, end)`` whose gradient matmuls must run.

    Without a filter: the whole vocabulary. With one: blocks of :data:`FILTER_BLOCK` columns whose
    largest |d_logits| over the chunk is below ``grad_filter * limit_scale`` are dropped, and the
    remaining blocks are merged into contiguous runs (one matmul each).
    """
    vocab = d_logits.shape[1]
    if grad_filter is None or vocab == 0:
        return [(0, vocab)]
    limit = grad_filter * limit_scale
    full = vocab - vocab % FILTER_BLOCK
    maxima = []
    if full:
        blocks = d_logits[:, :full].view(d_logits.shape[0], full // FILTER_BLOCK, FILTER_BLOCK)
        # max |x| as max(amax, -amin): no |x| copy of the chunk.
        maxima += torch.maximum(blocks.amax(dim=(0, 2)), -blocks.amin(dim=(0, 2))).tolist()
    if full < vocab:
        tail = d_logits[:, full:]
        maxima.append(max(tail.amax().item(), -tail.amin().item()))
    runs: list[tuple[int, int]] = []
    for block, block_max in enumerate(maxima):
        if block_max < limit:
            continue
        start, end = block * FILTER_BLOCK, min(vocab, (block + 1) * FILTER_BLOCK)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def grad_hidden_from_runs(d_logits: Tensor, weight: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """``d_logits @ weight`` restricted to the kept vocabulary runs -> [rows, H], input dtype."""
    if len(runs) == 1 and runs[0] == (0, weight.shape[0]):
        return d_logits @ weight
    out = d_logits.new_zeros(d_logits.shape[0], weight.shape[1])
    for start, end in runs:
        out.addmm_(d_logits[:, start:end], weight[start:end])
    return out


@functools.cache
def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``addmm(acc_fp32, a_half, b_half, out_dtype=float32, out=acc)`` accumulates in place
    correctly here (cuBLAS can; the CPU build has no such kernel). Probed once per device/dtype."""
    if device.type != "cuda":
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        # The same layouts as in use: a column slice of d_logits, transposed, into a row slice.
        d = torch.randn(8, 24, device=device, generator=gen).to(dtype)
        hidden = torch.randn(8, 16, device=device, generator=gen).to(dtype)
        acc = torch.ones(24, 16, device=device)
        for _ in range(2):
            torch.addmm(acc[4:20], d[:, 4:20].t(), hidden, out_dtype=torch.float32, out=acc[4:20])
        expected = torch.ones(24, 16, device=device)
        expected[4:20] += 2 * (d[:, 4:20].float().t() @ hidden.float())
        return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, ValueError):
        return False


def accumulate_product(acc: Tensor, left_t: Tensor, right: Tensor) -> None:
    """``acc += left_t @ right`` where ``acc`` may be float32 and the operands half precision."""
    if acc.dtype == left_t.dtype:
        acc.addmm_(left_t, right)
        return
    if _fp32_out_addmm_works(acc.device, left_t.dtype):
        torch.addmm(acc, left_t, right, out_dtype=acc.dtype, out=acc)
        return
    # Slices of rows keep the half-precision product small; each is rounded once, summed in fp32.
    rows = max(1, _ACCUMULATE_TEMP_BYTES // max(1, right.shape[1] * right.element_size()))
    for start in range(0, acc.shape[0], rows):
        acc[start:start + rows].add_(left_t[start:start + rows] @ right)


class WeightGradSink:
    """Weight and bias gradients summed over chunks: in fp32 when the parameters are half
    precision and there is more than one chunk to sum, unless ``accumulate_dtype`` says otherwise
    (the parameter's own dtype: half the memory and traffic, one rounding per chunk)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, want_weight: bool, want_bias: bool,
                 single_step: bool, accumulate_dtype: torch.dtype | None = None):
        def accumulator(param: Tensor) -> Tensor:
            if single_step or param.dtype in (torch.float32, torch.float64):
                dtype = param.dtype
            else:
                dtype = accumulate_dtype or torch.float32
            return torch.zeros(param.shape, device=param.device, dtype=dtype)

        self.weight, self.bias = weight, bias
        self.weight_acc = accumulator(weight) if want_weight else None
        self.bias_acc = accumulator(bias) if (want_bias and bias is not None) else None

    def add(self, d_logits: Tensor, hidden_rows: Tensor, runs: list[tuple[int, int]]) -> None:
        for start, end in runs:
            cols = d_logits[:, start:end]
            if self.weight_acc is not None:
                accumulate_product(self.weight_acc[start:end], cols.t(), hidden_rows)
            if self.bias_acc is not None:
                self.bias_acc[start:end] += cols.sum(0, dtype=self.bias_acc.dtype)

    def weight_grad(self) -> Tensor | None:
        return None if self.weight_acc is None else self.weight_acc.to(self.weight.dtype)

    def bias_grad(self) -> Tensor | None:
        return None if self.bias_acc is None else self.bias_acc.to(self.bias.dtype)



# --------------------------------------------------------------------------- per-token statistics

# Names and dtypes of the optional per-token statistics (``return_stats=True``); the float ones
# are in the log-probs' dtype (float32, float64 for float64 inputs).
STAT_NAMES = ("entropy", "mean_logits", "log_sum_sq_probs", "argmax", "is_top1")


def empty_stats(shape: torch.Size, float_dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """The statistics' values on positions that are not scored (ignored labels): 0.0 for the
    float statistics, -1 for ``argmax``, False for ``is_top1``."""
    stats = {name: torch.zeros(shape, dtype=float_dtype, device=device)
             for name in ("entropy", "mean_logits", "log_sum_sq_probs")}
    stats["argmax"] = torch.full(shape, -1, dtype=torch.int64, device=device)
    stats["is_top1"] = torch.zeros(shape, dtype=torch.bool, device=device)
    return stats


@functools.cache
def _triton_stats():
    """The Triton statistics kernel, or None where Triton cannot be imported."""
    try:
        from pyalign.kernels.token_stats import triton_token_stats  # noqa: PLC0415
    except ImportError:
        return None
    return triton_token_stats


def chunk_stats_into(stats: dict[str, Tensor], rows: slice, logits: Tensor, norm: Tensor,
                     labels: Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> None:
    """Per-token statistics of one chunk of logits ``[n, V]`` (any float dtype) whose rows'
    normaliser is ``norm`` [n, 2] (the backend's (M, L) of the transformed logits z), written into
    ``stats[name][rows]``.

    entropy = -sum_v p_v log p_v; mean_logits = sum_v z_v / V; log_sum_sq_probs = log sum_v p_v^2;
    argmax = the first index of the largest logit; is_top1 = (argmax == label). On CUDA one Triton
    kernel reads the chunk once; elsewhere torch ops in ``norm``'s dtype, in slices of rows so that
    every temporary stays under 32 MiB. The chunk itself is only read.
    """
    n, vocab = logits.shape
    math_dtype = norm.dtype
    if logits.is_cuda and math_dtype == torch.float32 and _triton_stats() is not None:
        # One read of the chunk, one exp per element (kernels/token_stats.py).
        out = slice(rows.start, rows.start + n)
        values = _triton_stats()(logits, norm, logit_scale, softcap)
        for name, value in zip(("entropy", "mean_logits", "log_sum_sq_probs", "argmax"), values):
            stats[name][out] = value
        stats["is_top1"][out] = values[3] == labels
        return
    a = exponent_scale(logit_scale, softcap)
    step = max(1, _STATS_TEMP_BYTES // max(1, vocab * torch.empty((), dtype=math_dtype).element_size()))
    for start in range(0, n, step):
        end = min(n, start + step)
        out = slice(rows.start + start, rows.start + end)
        y = logits[start:end].to(math_dtype, copy=True)
        # The transforms are increasing: the logits' argmax is z's, without the ties that
        # rounding a saturated tanh would add.
        argmax = y.argmax(1)
        stats["argmax"][out] = argmax
        stats["is_top1"][out] = argmax == labels[start:end]
        if softcap is not None:  # y = softcap * tanh(logit_scale * x / softcap), in place
            y.mul_(logit_scale / softcap).tanh_().mul_(softcap)
        stats["mean_logits"][out] = y.sum(1) * (a / vocab)
        # log p = a (y - M) - L (pyalign.reference.normalised_logprobs), in place.
        log_p = y.sub_(norm[start:end, 0:1])
        if a != 1.0:
            log_p.mul_(a)
        log_p.sub_(norm[start:end, 1:2])
        # p log p with p = 0 (a -inf logit) is 0, not 0 * -inf = nan.
        p_log_p = log_p.exp().mul_(log_p).nan_to_num_(nan=0.0)
        stats["entropy"][out] = -p_log_p.sum(1)
        del p_log_p
        stats["log_sum_sq_probs"][out] = torch.logsumexp(log_p.mul_(2), dim=1)


# --------------------------------------------------------------------------- vocabulary-major backward


def vocab_block_columns(budget_bytes: int, rows: int, dtype: torch.dtype, vocab: int) -> int:
    """Columns of a ``[rows, columns]`` logits block of ``dtype`` within ``budget_bytes`` (at
    least 1, at most ``vocab``), rounded down to a multiple of 64 for the matmuls."""
    return rows_for_budget(budget_bytes, rows, dtype, vocab) if rows else max(1, vocab)


def non_label_gradient(logit: Tensor, norm: Tensor, grad: Tensor, logit_scale: float = 1.0,
                       softcap: float | None = None) -> Tensor:
    """``-g * p * dz/dx`` of one column of logits ``[n]`` that is not the label's, in ``norm``'s
    dtype: what the backend kernels write there (``p = exp(a (y - M) - L)``)."""
    x = logit.to(norm.dtype)
    p = normalised_logprobs(x.unsqueeze(1), norm, logit_scale, softcap).squeeze(1).exp_()
    return -grad * p * transform_derivative(x, logit_scale, softcap)


def vocab_major_backward(grad_kept: Tensor, hidden_kept: Tensor, weight: Tensor, bias: Tensor | None,
                         labels_kept: Tensor, norm_kept: Tensor, backend,
                         block_cols: int, needs: tuple[bool, bool, bool],
                         grad_filter: float | None = None, logit_scale: float = 1.0,
                         softcap: float | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_t g_t * logp_t`` over K kept tokens, one vocabulary block at a time.

    Per block of ``block_cols`` columns ``[v0, v1)``: the block's logits ``hidden_kept @
    weight[v0:v1].T (+ bias)`` for all K tokens, overwritten in place by the backend kernel with
    ``d = g * (onehot - softmax(z)) * dz/dx`` (``norm_kept [K, 2]``, each row's normaliser, saved
    by the forward; z the logits after ``logit_scale`` / ``softcap``), then

    - ``grad_weight[v0:v1] = d.T @ hidden_kept`` and ``grad_bias[v0:v1] = d.sum(0)``: written once,
      one matmul over all tokens (fp32 accumulation inside it, one rounding), so no [V, H] float32
      accumulator exists;
    - ``grad_hidden += d @ weight[v0:v1]``, summed over blocks in a [K, H] float32 accumulator.

    A token whose label lies outside the block has no one-hot term there. The kernels take one
    label per row in ``[0, block)``, so such rows are given label 0 and their column 0 is then
    rewritten from the logit saved before the kernel ran (:func:`non_label_gradient`), fp32, one
    rounding, exactly what the kernel writes for a non-label column.

    Returns ``(grad_hidden [K, H] in hidden's dtype, grad_weight [V, H], grad_bias [V])``, None
    where ``needs`` says not needed.
    """
    need_hidden, need_weight, need_bias = needs
    rows, width = hidden_kept.shape
    vocab = weight.shape[0]
    math_dtype = norm_kept.dtype
    acc_dtype = torch.promote_types(hidden_kept.dtype, torch.float32)
    hidden_acc = torch.zeros(rows, width, dtype=acc_dtype, device=hidden_kept.device) if need_hidden else None
    # Every row of grad_weight is written once, unless the filter drops its block: zeros then.
    fresh = torch.empty_like if (grad_filter is None and rows) else torch.zeros_like
    grad_weight = fresh(weight) if need_weight else None
    grad_bias = fresh(bias) if (need_bias and bias is not None) else None
    if rows == 0 or vocab == 0:
        return (None if hidden_acc is None else hidden_acc.to(hidden_kept.dtype)), grad_weight, grad_bias
    block_cols = max(1, min(block_cols, vocab))
    flat = hidden_kept.new_empty(rows * block_cols)
    grad2 = grad_kept.to(math_dtype).unsqueeze(0).contiguous()
    norm2 = norm_kept.unsqueeze(0).contiguous()
    limit_scale = grad_kept.abs().max().item() if grad_filter is not None else 1.0
    for v0 in range(0, vocab, block_cols):
        v1 = min(vocab, v0 + block_cols)
        logits = linear_into(flat[: rows * (v1 - v0)].view(rows, v1 - v0), hidden_kept, weight[v0:v1],
                             None if bias is None else bias[v0:v1])
        local = labels_kept - v0
        in_block = (local >= 0) & (local < v1 - v0)
        first_logit = logits[:, 0].to(math_dtype, copy=True)
        # Local labels are >= 0, so -1 never marks a row as ignored (the caller's ignore_index might).
        backend.backward(logits.unsqueeze(0), torch.where(in_block, local, 0).unsqueeze(0), norm2, grad2,
                         -1, logits.unsqueeze(0), logit_scale, softcap)
        not_label = non_label_gradient(first_logit, norm_kept, grad2[0], logit_scale, softcap)
        logits[:, 0] = torch.where(in_block, logits[:, 0].to(math_dtype), not_label).to(logits.dtype)
        runs = kept_vocab_runs(logits, grad_filter, limit_scale)
        for start, end in runs:
            cols = logits[:, start:end]
            if grad_weight is not None:
                torch.mm(cols.t(), hidden_kept, out=grad_weight[v0 + start:v0 + end])
            if grad_bias is not None:
                grad_bias[v0 + start:v0 + end] = cols.sum(0, dtype=acc_dtype).to(grad_bias.dtype)
            if hidden_acc is not None:
                accumulate_product(hidden_acc, cols, weight[v0 + start:v0 + end])
    return (None if hidden_acc is None else hidden_acc.to(hidden_kept.dtype)), grad_weight, grad_bias
