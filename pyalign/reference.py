"""The eager float64 reference of pyalign's formulas (SPEC section 3.1).

This module is the specification in code: the ``"torch"`` backend runs it, and every fast path
(C++, Triton, CUDA, fused-linear) is tested against it, never against another fast path.

Logit transforms (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma 2/3's
``final_logit_softcapping``): the log-probs are those of

    z = logit_scale * x                                   (softcap None)
    z = softcap * tanh(logit_scale * x / softcap)         (softcap given)

Both maps are increasing, so every row is normalised through ``y``, a monotone stand-in for z with
``z - z' = a * (y - y')``: ``y = x, a = logit_scale`` without soft-capping, ``y = z, a = 1`` with
it. A row's normaliser is the pair ``(M, L)``: ``M = max_v y_v`` and
``L = log sum_v exp(a * (y_v - M))``, and ``log p_v = a * (y_v - M) - L``. The log-sum-exp
``a * M + L`` is never formed: at |M| >= 2**24 (float32) or 2**53 (float64) it would round L away
and return 0 for ``log p`` instead of ``-log V``; ``y_v - M`` of two numbers of the row is exact
where it matters (Sterbenz), so this stays within rounding of the exact answer for any finite row.
"""

from __future__ import annotations

import math

import torch

# Labels equal to this are not scored (prompt tokens, padding): log-prob 0, gradient 0. The one
# definition every layer uses (torch's and transformers' convention).
IGNORE_INDEX = -100


def output_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Log-probs are float32, except for float64 logits (so gradcheck keeps its precision)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- logit transforms


def validate_logit_transform(logit_scale, softcap) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` as floats, or a ValueError naming the argument."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) \
            or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale: expected a finite positive float, got {logit_scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap: expected None or a finite positive float, got {softcap!r}")
    return float(logit_scale), (None if softcap is None else float(softcap))


def exponent_scale(logit_scale: float, softcap: float | None) -> float:
    """``a`` in ``z - z' = a * (y - y')``: ``logit_scale`` without soft-capping, else 1."""
    return 1.0 if softcap is not None else float(logit_scale)


def monotone_logits(x: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``y``: the logits themselves, or the soft-capped logits; in ``x``'s dtype (no copy when the
    row is used as it is)."""
    if softcap is None:
        return x
    return torch.tanh(x * (logit_scale / softcap)) * softcap


def transformed_logits(x: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``z``, the logits the log-softmax is taken of, in ``x``'s dtype."""
    return monotone_logits(x, logit_scale, softcap) * exponent_scale(logit_scale, softcap)


def transform_derivative(x: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor | float:
    """``dz / dx``: ``logit_scale``, times ``1 - tanh^2(logit_scale * x / softcap)`` when soft-capped."""
    if softcap is None:
        return float(logit_scale)
    t = torch.tanh(x * (logit_scale / softcap))
    return (1 - t * t) * logit_scale


def normalised_logprobs(x: torch.Tensor, norm: torch.Tensor, logit_scale: float = 1.0,
                        softcap: float | None = None) -> torch.Tensor:
    """``log p = a * (y - M) - L`` for logits ``x [..., V]`` and their rows' normaliser
    ``norm [..., 2]`` (``M``, ``L``), in ``norm``'s dtype."""
    y = monotone_logits(x.to(norm.dtype), logit_scale, softcap)
    shifted = y - norm[..., 0:1]
    a = exponent_scale(logit_scale, softcap)
    if a != 1.0:
        shifted = shifted * a
    return shifted - norm[..., 1:2]


def row_normaliser(x: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``norm [..., 2]``: ``M = max_v y_v`` and ``L = log sum_v exp(a (y_v - M))`` of each row of
    ``x [..., V]``, in ``x``'s dtype. A row of -inf (no softcap) has M = -inf and L = NaN, like
    torch's log_softmax of it."""
    y = monotone_logits(x, logit_scale, softcap)
    row_max = y.amax(-1)
    shifted = (y - row_max.unsqueeze(-1)) * exponent_scale(logit_scale, softcap)
    return torch.stack([row_max, torch.logsumexp(shifted, dim=-1)], dim=-1)


# --------------------------------------------------------------------------- the op


def reference_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
    logit_scale: float = 1.0, softcap: float | None = None,
) -> torch.Tensor:
    """log p(label | z) per position in float64 math, differentiable by autograd (through the
    transform too); z = the transformed logits (module docstring).

    logits [..., V], labels [...] (integer); 0 where ``labels == ignore_index``.
    """
    logit_scale, softcap = validate_logit_transform(logit_scale, softcap)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    y = monotone_logits(logits.double(), logit_scale, softcap)
    # Shift by the (constant) row maximum before the log-softmax: the log-sum-exp it forms is then
    # that of numbers <= 0 and cannot swallow log V at large offsets.
    shifted = (y - y.detach().amax(-1, keepdim=True)) * exponent_scale(logit_scale, softcap)
    logp = torch.log_softmax(shifted, dim=-1)
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(keep, picked, torch.zeros_like(picked))
    return picked.to(output_dtype(logits.dtype))


def reference_forward(
    logits3: torch.Tensor, labels2: torch.Tensor, ignore_index: int,
    logit_scale: float = 1.0, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend-contract forward (docs/DESIGN.md): returns (logp [B, T], norm [B, T, 2])."""
    out_dtype = output_dtype(logits3.dtype)
    x = logits3.double()
    norm = row_normaliser(x, logit_scale, softcap)
    keep = labels2 != ignore_index
    safe_labels = torch.where(keep, labels2, torch.zeros_like(labels2))
    picked = normalised_logprobs(x.gather(-1, safe_labels.unsqueeze(-1)), norm, logit_scale, softcap).squeeze(-1)
    logp = torch.where(keep, picked, torch.zeros_like(picked))
    return logp.to(out_dtype), norm.to(out_dtype)


def reference_backward(
    logits3: torch.Tensor,
    labels2: torch.Tensor,
    norm2: torch.Tensor,
    grad2: torch.Tensor,
    ignore_index: int,
    grad_out3: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> None:
    """Backend-contract backward: grad_out3 <- grad * (onehot(label) - softmax(z)) * dz/dx, 0 on
    ignored rows."""
    x = logits3.double()
    keep = labels2 != ignore_index
    safe_labels = torch.where(keep, labels2, torch.zeros_like(labels2))
    grad = torch.where(keep, grad2.double(), torch.zeros_like(grad2, dtype=torch.float64))
    d = -torch.exp(normalised_logprobs(x, norm2.double(), logit_scale, softcap)) * grad.unsqueeze(-1)
    d.scatter_add_(-1, safe_labels.unsqueeze(-1), grad.unsqueeze(-1))
    derivative = transform_derivative(x, logit_scale, softcap)
    if not (isinstance(derivative, float) and derivative == 1.0):
        d = d * derivative
    # norm2 (and the row itself) may be anything on ignored rows: select zeros, never multiply.
    grad_out3.copy_(torch.where(keep.unsqueeze(-1), d, torch.zeros_like(d)))


def reference_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
    logit_scale: float = 1.0, softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position statistics of the softmax of the transformed logits z in float64 math
    (``return_stats`` of the fused lm_head): entropy ``-sum p log p``, ``mean_logits`` (of z),
    ``log_sum_sq_probs`` = ``log sum p^2``, ``argmax`` (first index of the largest logit; the
    transforms are increasing, so that of x: rounding a saturated tanh could only add ties) and
    ``is_top1`` (``argmax == label``). On ignored positions: 0.0, 0.0, 0.0, -1 and False.
    logits [..., V], labels [...]."""
    logit_scale, softcap = validate_logit_transform(logit_scale, softcap)
    keep = labels != ignore_index
    x = logits.double()
    log_p = normalised_logprobs(x, row_normaliser(x, logit_scale, softcap), logit_scale, softcap)
    p = log_p.exp()
    zero = torch.zeros(labels.shape, dtype=torch.float64, device=logits.device)
    argmax = x.argmax(-1)
    stats = {
        "entropy": -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1),
        "mean_logits": transformed_logits(x, logit_scale, softcap).mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
    }
    out = {name: torch.where(keep, value, zero).to(output_dtype(logits.dtype)) for name, value in stats.items()}
    out["argmax"] = torch.where(keep, argmax, torch.full_like(argmax, -1))
    out["is_top1"] = keep & (argmax == labels)
    return out
