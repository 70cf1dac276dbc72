"""Adaptive alpha for SPO: dual ascent on the weights of the earlier dimensions during a round.

SPO round n maximises dimension n's preference reward while keeping every earlier dimension k's
reward above a threshold H_k (the paper's constrained problem; it names solving the dual to set
alpha and gives no recipe). In the Lagrangian the alphas play the multipliers, so dual ascent
moves alpha_k up while constraint k is violated and down while it holds with room to spare:

    every ``every`` optimizer steps, for each earlier dimension k = 1..n-1:
        m_k   = mean over held-out pairs of dimension k of
                beta * [log pi(y_w)/pi_0(y_w) - log pi(y_l)/pi_0(y_l)]     (current policy, teacher-forced)
        H_k   = keep * m_k(pi_{n-1})                                          (what the round started with)
        alpha_k <- clip(alpha_k + step_size * (H_k - m_k) / max(|H_k|, 1e-3), 0, 1)

and the round's kappas are recomputed from the new alphas (docs/training.md, "Adaptive alpha").
The shortfall is relative to H_k, so ``step_size`` means the same for dimensions whose margins
differ in scale: with ``step_size`` 1, a margin 20% below its threshold raises alpha_k by 0.2.

Config (``method.adaptive_alpha``, spo only; every earlier round needs eval pairs)::

    method: {loss: spo, alpha: 0.1, adaptive_alpha: {keep: 0.9, every: 2, step_size: 1.0, max_pairs: 32}}

``method.alpha`` is the starting value (it must be above 0: a round that starts with every alpha
0 is plain DPO from pi_{n-1} and has no chain to weigh). The log-probs of pi_0 (the reference)
and pi_{n-1} (for H_k) on the earlier dimensions' eval pairs are cached with the run's frozen
log-probs. Each round's trajectory (margins, thresholds and alphas per update) is written to
``<round dir>/adaptive_alpha.json``; the alphas themselves are part of the objective's state, so
a resumed round continues with them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pyalign import distributed
from pyalign.io import write_json_atomic
from pyalign.models import load_model
from pyalign.tasks.preference.config import AdaptiveAlphaConfig, round_alphas, round_dir
from pyalign.tasks.preference.evaluate import preference_metrics
from pyalign.train import dataset_logprobs, shard_model

logger = logging.getLogger("pyalign.train")
LOG_FILE = "adaptive_alpha.json"
_FLOOR = 1e-3  # |H_k| below this: the shortfall is measured against this instead


def mean_margin(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                beta: float) -> float:
    """beta * mean[(log pi(y_w) - log pi_0(y_w)) - (log pi(y_l) - log pi_0(y_l))] (the implicit-reward
    margin of :func:`pyalign.tasks.preference.evaluate.preference_metrics`)."""
    return preference_metrics(*policy, *reference, beta=beta)["reward_margin"]


def dual_ascent_step(alphas, margins, thresholds, step_size: float) -> list[float]:
    """One update: alpha_k <- clip(alpha_k + step_size * (H_k - m_k) / max(|H_k|, 1e-3), 0, 1)."""
    return [min(1.0, max(0.0, a + step_size * (h - m) / max(abs(h), _FLOOR)))
            for a, m, h in zip(alphas, margins, thresholds)]


class AdaptiveAlpha:
    """The step callback of one SPO round that adapts its alphas (see the module docstring).

    ``earlier``: per earlier dimension k = 1..n-1, ``(pairs, reference, start)``: its held-out
    pairs (a :class:`pyalign.data.PreferenceDataset`, first ``max_pairs`` used), pi_0's and
    pi_{n-1}'s (chosen, rejected) log-probs on those pairs."""

    def __init__(self, settings: AdaptiveAlphaConfig, earlier: list, *, beta: float, batch_size: int,
                 device, mixed_precision: str = "no", fused="auto", log_file: str | Path | None = None):
        self.settings = settings
        self.beta = beta
        self.batch_size = batch_size
        self.device = device
        self.mixed_precision = mixed_precision
        self.fused = fused
        self.log_file = Path(log_file) if log_file is not None else None
        self.pairs = [pairs for pairs, _, _ in earlier]
        self.indices = [list(range(min(settings.max_pairs, len(pairs)))) for pairs in self.pairs]
        self.reference = [(ref[0][idx], ref[1][idx]) for (_, ref, _), idx in zip(earlier, self.indices)]
        self.start_margins = [mean_margin((start[0][idx], start[1][idx]), ref, beta)
                              for (_, _, start), ref, idx in zip(earlier, self.reference, self.indices)]
        self.thresholds = [settings.keep * m for m in self.start_margins]
        self.history: list[dict] = self._load_history()

    def _load_history(self) -> list[dict]:
        if self.log_file is None or not self.log_file.is_file():
            return []
        import json  # noqa: PLC0415

        return json.loads(self.log_file.read_text(encoding="utf-8")).get("history", [])

    @torch.no_grad()
    def margins(self, model) -> list[float]:
        """The policy's mean margin vs pi_0 on each earlier dimension's held-out pairs."""
        result = []
        for pairs, indices, reference in zip(self.pairs, self.indices, self.reference):
            policy = dataset_logprobs(model, pairs, batch_size=self.batch_size, device=self.device,
                                      mixed_precision=self.mixed_precision, average=False, fused=self.fused,
                                      indices=indices)
            result.append(mean_margin(policy, reference, self.beta))
        return result

    def __call__(self, event: str, info: dict) -> None:
        if event != "step":
            return
        step, trainer = info["step"], info["trainer"]
        # a resumed round: entries after its checkpoint belong to the run that was killed
        self.history = [entry for entry in self.history if entry["step"] < step]
        if step % self.settings.every:
            return
        margins = self.margins(trainer.model)
        before = list(trainer.objective.alphas)
        after = dual_ascent_step(before, margins, self.thresholds, self.settings.step_size)
        trainer.objective.set_alphas(after)
        self.history.append({"step": step, "margins": margins, "alphas_before": before, "alphas": after})
        logger.info("adaptive alpha, step %d: margins %s (thresholds %s) -> alphas %s", step,
                    _fmt(margins), _fmt(self.thresholds), _fmt(after))
        self.write()

    def write(self) -> None:
        if self.log_file is None or not distributed.is_main():
            return
        write_json_atomic(self.log_file, {
            "settings": self.settings.model_dump(), "beta": self.beta, "start_margins": self.start_margins,
            "thresholds": self.thresholds, "history": self.history,
        })


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def for_round(run, round_number: int) -> AdaptiveAlpha | None:
    """The controller of SPO round ``round_number`` of a :class:`pyalign.tasks.preference.rounds.SequentialRun`
    (None when the run does not adapt alpha or the round has no alphas). Log-probs of pi_0 and
    pi_{n-1} on the earlier rounds' eval pairs come from the run's cache, computed (and cached,
    by process 0) when missing."""
    config = run.config
    settings = config.method.adaptive_alpha
    if settings is None or not round_alphas(config, round_number):
        return None
    earlier = []
    for k in range(1, round_number):
        pairs = run.dataset(k, "eval")
        reference = _cached_logprobs(run, 0, k)
        start = _cached_logprobs(run, round_number - 1, k)
        earlier.append((pairs, reference, start))
    return AdaptiveAlpha(
        settings, earlier, beta=config.method.beta,
        batch_size=run.training.eval_batch_size or run.training.batch_size, device=run.device,
        mixed_precision=run.training.mixed_precision, fused=run.training.fused_lm_head,
        log_file=round_dir(config, round_number) / LOG_FILE,
    )


def _cached_logprobs(run, model_index: int, round_number: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_i's (chosen, rejected) log-probs on round ``round_number``'s eval pairs, from the run's
    log-prob cache (the same entry the frozen chain would use) or computed now."""
    key = run.cache_key(model_index, round_number, "eval")
    entry = run.cache.load(key)
    if entry is not None:
        return entry
    logger.info("adaptive alpha: log-probs of pi_%d on round %d eval", model_index, round_number)
    model = shard_model(load_model(run.model_dirs[model_index], run.config.model.dtype, run.device), run.training,
                        run.device)
    chosen, rejected = dataset_logprobs(
        model, run.dataset(round_number, "eval"), batch_size=run.training.eval_batch_size or run.training.batch_size,
        device=run.device, mixed_precision=run.training.mixed_precision, average=False,
        fused=run.training.fused_lm_head,
    )
    del model
    if distributed.is_main():
        run.cache.save(key, chosen, rejected)
    return chosen, rejected
