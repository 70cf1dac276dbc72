"""Preference losses on sequence log-probabilities (SPEC 3.2 and 3.3).

Every loss takes ``[B]`` sequence log-probs (policy and reference, chosen and rejected) and returns
a :class:`LossOutput` whose ``loss`` is the mean over pairs of a per-pair term. These functions are
plain torch: they are both the reference and the implementation, since they cost O(B).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossOutput:
    """``loss`` (scalar, differentiable); rewards ``[B]`` float32, detached.

    ``metrics`` (reward accuracy and margin, mean rewards, plus ``extra`` such as kl or nll) are
    computed when read: reading them synchronises with the GPU, building the output does not.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extra: dict[str, Tensor | float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        margin = self.chosen_rewards - self.rejected_rewards
        values = {}
        if margin.numel():
            values = {
                "reward_accuracy": (margin > 0).float().mean().item(),
                "reward_margin": margin.mean().item(),
                "chosen_reward": self.chosen_rewards.mean().item(),
                "rejected_reward": self.rejected_rewards.mean().item(),
            }
        values.update({name: float(value) for name, value in self.extra.items()})
        return values


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_beta(beta: float) -> None:
    if not (_is_number(beta) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta: expected a positive finite number, got {beta!r}")


def _check_pairs(**tensors: Tensor) -> None:
    shape = None
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor of shape [B], got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"{name}: expected shape [B], got {tuple(value.shape)}")
        if shape is not None and value.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} like the others, got {tuple(value.shape)}")
        shape = value.shape


def _finish(per_pair: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    # mean() of an empty batch is NaN; an empty batch contributes nothing instead.
    loss = per_pair.mean() if per_pair.numel() else per_pair.sum()
    return LossOutput(loss, chosen_rewards.detach().float(), rejected_rewards.detach().float())


def _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    return policy_chosen - ref_chosen.detach(), policy_rejected - ref_rejected.detach()


# label_smoothing is the rate at which labels are taken to be flipped: above 0.5 the loss would
# prefer the rejected response. dpo at 0.5 is flat in the preference (a pull towards equal
# rewards, still defined); robust divides by 1 - 2 * eps, so it needs eps < 0.5.
SMOOTHING_RANGES = {"dpo": (0.5, True), "robust": (0.5, False)}


def _check_smoothing(label_smoothing: float, loss: str) -> None:
    upper, inclusive = SMOOTHING_RANGES[loss]
    inside = _is_number(label_smoothing) and 0.0 <= label_smoothing and (
        label_smoothing <= upper if inclusive else label_smoothing < upper)
    if not inside:
        interval = f"[0, {upper}]" if inclusive else f"[0, {upper})"
        raise ValueError(f"label_smoothing: expected a value in {interval} for {loss}, got {label_smoothing!r}")


def _check_alphas(alphas) -> list[float]:
    if isinstance(alphas, (str, bytes, Tensor)) or not isinstance(alphas, Iterable):
        raise ValueError(f"alphas: expected a list of numbers in [0, 1], got {alphas!r}")
    alphas = list(alphas)
    for k, alpha in enumerate(alphas):
        if not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alphas[{k}]: expected a value in [0, 1], got {alpha!r}")
    return [float(a) for a in alphas]


def _check_kl(kl) -> None:
    if kl is None or isinstance(kl, Tensor):
        return
    if not (_is_number(kl) and kl >= 0 and math.isfinite(kl)):
        raise ValueError(f"kl: expected a non-negative finite estimate (or None for the batch estimate), got {kl!r}")


def check_nll_weight(nll_weight: float) -> None:
    if not (_is_number(nll_weight) and nll_weight >= 0 and math.isfinite(nll_weight)):
        raise ValueError(f"nll_weight: expected a non-negative finite number, got {nll_weight!r}")


def check_loss_options(loss: str, *, beta: float, **options) -> None:
    """Raise ValueError, naming the argument, when a hyper-parameter of ``loss`` is out of range
    (called when a loss is built, so a bad value fails before the first batch)."""
    get_loss(loss)
    _check_beta(beta)
    if "label_smoothing" in options:
        _check_smoothing(options["label_smoothing"], loss)
    if "alphas" in options:
        _check_alphas(options["alphas"])
        spo_coefficients(options["alphas"], beta)
    if "kl" in options:
        _check_kl(options["kl"])


def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, label_smoothing=0.0):
    """Sigmoid DPO, conservative (label-smoothed) when ``label_smoothing > 0``."""
    _check_beta(beta)
    _check_smoothing(label_smoothing, "dpo")
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = beta * (c - r)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _finish(per_pair, beta * c, beta * r)


def ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1):
    """IPO; expects length-averaged log-probs (``PreferenceLoss`` averages for it)."""
    _check_beta(beta)
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = ((c - r) - 1.0 / (2.0 * beta)) ** 2
    return _finish(per_pair, beta * c, beta * r)


def hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1):
    _check_beta(beta)
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = torch.relu(1 - beta * (c - r))
    return _finish(per_pair, beta * c, beta * r)


def robust(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, label_smoothing=0.0):
    """Robust DPO: unbiased under label noise rate ``label_smoothing`` (< 0.5)."""
    _check_beta(beta)
    _check_smoothing(label_smoothing, "robust")
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = beta * (c - r)
    eps = label_smoothing
    per_pair = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _finish(per_pair, beta * c, beta * r)


def apo_zero(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1):
    """APO-zero: raises the winner's likelihood, lowers the loser's (winners better than the model)."""
    _check_beta(beta)
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    return _finish(per_pair, beta * c, beta * r)


def apo_down(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1):
    """APO-down: lowers both likelihoods, the loser's more (winners worse than the model)."""
    _check_beta(beta)
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
    return _finish(per_pair, beta * c, beta * r)


def kto_kl_estimate(policy_mismatched: Tensor, ref_mismatched: Tensor) -> Tensor:
    """KTO's reference point: mean of ``logp - ref`` over mismatched prompt/response pairs
    (e.g. each prompt with the next pair's response), clamped at 0 and detached."""
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_pair(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, kl=None):
    """KTO on pairs. ``kl``: a given reference point (e.g. :func:`kto_kl_estimate` on
    mismatched pairs); when None, the detached batch mean of ``logp - ref`` over the chosen and
    rejected responses, clamped at 0."""
    _check_beta(beta)
    _check_kl(kl)
    c, r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if kl is None:
        kl = torch.cat([c, r]).mean().clamp(min=0).detach() if c.numel() else c.new_zeros(())
    kl = torch.as_tensor(kl, dtype=c.dtype, device=c.device).detach()
    if kl.numel() != 1:
        raise ValueError(f"kl: expected a scalar, got shape {tuple(kl.shape)}")
    per_pair = (1 - torch.sigmoid(beta * c - beta * kl)) + (1 - torch.sigmoid(beta * kl - beta * r))
    out = _finish(per_pair, beta * c, beta * r)
    out.extra["kl"] = kl
    return out


def spo_coefficients(alphas: Sequence[float], beta: float) -> list[float]:
    """kappa_1..kappa_n of SPO round n = len(alphas) + 1 (SPEC 3.3, paper Eq. 7).

    ``kappa_n = beta``; ``kappa_k = -beta * alpha_k * prod_{m=k+1}^{n-1} (1 - alpha_m)``.
    """
    _check_beta(beta)
    alphas = _check_alphas(alphas)
    n = len(alphas) + 1
    kappas = []
    for k in range(1, n):
        keep = math.prod(1.0 - alphas[m - 1] for m in range(k + 1, n))
        kappas.append(-beta * alphas[k - 1] * keep)
    kappas.append(float(beta))
    return kappas


def spo_rewards(policy: Tensor, chain: Tensor, kappas: Sequence[float]) -> Tensor:
    """``R_n(y) = sum_i kappa_i * (log pi_i(y) - log pi_{i-1}(y))`` with pi_n the policy."""
    logps = torch.cat([chain.detach().to(policy.dtype), policy.unsqueeze(0)], dim=0)
    steps = logps[1:] - logps[:-1]
    weights = torch.tensor(kappas, dtype=policy.dtype, device=policy.device).unsqueeze(1)
    return (weights * steps).sum(0)


def spo(policy_chosen, policy_rejected, chain_chosen, chain_rejected, *, alphas, beta=0.1):
    """SPO round n: ``-logsigmoid(R_n(y_w) - R_n(y_l))``.

    ``chain_*``: ``[n, B]`` sequence log-probs of the frozen pi_0..pi_{n-1} (the last one is the
    reference); ``alphas``: n-1 weights of the earlier dimensions (all 0: sequential DPO).
    """
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    for name, chain in (("chain_chosen", chain_chosen), ("chain_rejected", chain_rejected)):
        if not isinstance(chain, Tensor) or chain.dim() != 2 or chain.shape[1] != policy_chosen.shape[0]:
            got = tuple(chain.shape) if isinstance(chain, Tensor) else type(chain).__name__
            raise ValueError(f"{name}: expected shape [n, {policy_chosen.shape[0]}], got {got}")
    if chain_chosen.shape != chain_rejected.shape:
        raise ValueError(
            f"chain_rejected: expected shape {tuple(chain_chosen.shape)} like chain_chosen, "
            f"got {tuple(chain_rejected.shape)}"
        )
    alphas = list(alphas)
    n = chain_chosen.shape[0]
    if len(alphas) != n - 1:
        raise ValueError(
            f"alphas: round n={n} (chain of {n} frozen models) needs n-1={n - 1} alphas, got {len(alphas)}"
        )
    kappas = spo_coefficients(alphas, beta)
    chosen_rewards = spo_rewards(policy_chosen, chain_chosen, kappas)
    rejected_rewards = spo_rewards(policy_rejected, chain_rejected, kappas)
    per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return _finish(per_pair, chosen_rewards, rejected_rewards)


def nll(policy_chosen: Tensor, *, num_tokens: Tensor | None = None) -> Tensor:
    """SFT term on the chosen responses: mean over pairs of ``-logp / num_tokens``
    (``num_tokens=None``: of ``-logp``, for log-probs that are already length-averaged)."""
    _check_pairs(policy_chosen=policy_chosen)
    per_pair = -policy_chosen
    if num_tokens is not None:
        per_pair = per_pair / num_tokens.to(per_pair.dtype).clamp(min=1)
    return per_pair.mean() if per_pair.numel() else per_pair.sum()


PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo, "ipo": ipo, "hinge": hinge, "robust": robust,
    "apo_zero": apo_zero, "apo_down": apo_down, "kto_pair": kto_pair,
}
LOSSES = tuple(PAIRWISE_LOSSES) + ("spo",)


def get_loss(name: str) -> Callable[..., LossOutput]:
    if name == "spo":
        return spo
    if name not in PAIRWISE_LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")
    return PAIRWISE_LOSSES[name]
