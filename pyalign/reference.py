"""The eager float64 reference of pyalign's formulas (SPEC section 3.1).

This module is the specification in code: the ``"torch"`` backend runs it, and every fast path
(C++, Triton, CUDA, fused-linear) is tested against it, never against another fast path.
"""

from __future__ import annotations

import torch

# Labels equal to this are not scored (prompt tokens, padding): log-prob 0, gradient 0. The one
# definition every layer uses (torch's and transformers' convention).
IGNORE_INDEX = -100


def output_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Log-probs are float32, except for float64 logits (so gradcheck keeps its precision)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def reference_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """log p(label | logits) per position in float64 math, differentiable by autograd.

    logits [..., V], labels [...] (integer); 0 where ``labels == ignore_index``.
    """
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(keep, picked, torch.zeros_like(picked))
    return picked.to(output_dtype(logits.dtype))


def reference_forward(
    logits3: torch.Tensor, labels2: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend-contract forward (docs/DESIGN.md): returns (logp, lse) of shape [B, T]."""
    out_dtype = output_dtype(logits3.dtype)
    x = logits3.double()
    lse = torch.logsumexp(x, dim=-1)
    keep = labels2 != ignore_index
    safe_labels = torch.where(keep, labels2, torch.zeros_like(labels2))
    picked = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, picked - lse, torch.zeros_like(lse))
    return logp.to(out_dtype), lse.to(out_dtype)


def reference_backward(
    logits3: torch.Tensor,
    labels2: torch.Tensor,
    lse2: torch.Tensor,
    grad2: torch.Tensor,
    ignore_index: int,
    grad_out3: torch.Tensor,
) -> None:
    """Backend-contract backward: grad_out3 <- grad * (onehot(label) - softmax), 0 on ignored rows."""
    x = logits3.double()
    keep = labels2 != ignore_index
    safe_labels = torch.where(keep, labels2, torch.zeros_like(labels2))
    grad = torch.where(keep, grad2.double(), torch.zeros_like(grad2, dtype=torch.float64))
    d = -torch.exp(x - lse2.double().unsqueeze(-1)) * grad.unsqueeze(-1)
    # lse2 (and the row itself) may be anything on ignored rows: select zeros, never multiply.
    d = torch.where(keep.unsqueeze(-1), d, torch.zeros_like(d))
    d.scatter_add_(-1, safe_labels.unsqueeze(-1), grad.unsqueeze(-1))
    grad_out3.copy_(d)


def reference_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Per-position statistics of the softmax in float64 math (``return_stats`` of the fused
    lm_head): entropy ``-sum p log p``, ``mean_logits``, ``log_sum_sq_probs`` = ``log sum p^2``,
    ``argmax`` (first index of the largest logit) and ``is_top1`` (``argmax == label``).
    On ignored positions: 0.0, 0.0, 0.0, -1 and False. logits [..., V], labels [...]."""
    keep = labels != ignore_index
    x = logits.double()
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    zero = torch.zeros(labels.shape, dtype=torch.float64, device=logits.device)
    argmax = x.argmax(-1)
    stats = {
        "entropy": -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1),
        "mean_logits": x.mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
    }
    out = {name: torch.where(keep, value, zero).to(output_dtype(logits.dtype)) for name, value in stats.items()}
    out["argmax"] = torch.where(keep, argmax, torch.full_like(argmax, -1))
    out["is_top1"] = keep & (argmax == labels)
    return out
