"""The config of ``task: preference``: DPO/APO/... rounds, one per preference dimension, and SPO
across them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, Strict

from pyalign.data.sources import check_data_source
from pyalign.losses import LOSSES, SMOOTHING_RANGES
from pyalign.train import (
    Boolean, ConfigError, Fraction, LoraConfig, ModelConfig, NonNegativeFloat, PathValue, PositiveFloat,
    PositiveInt, Section, TrainingConfig, UnitInterval, check_lengths, check_model_folder, checked, config_to_dict,
    expect, field, float_type, one_of, one_or_list, section,
)

SMOOTHED_LOSSES = tuple(SMOOTHING_RANGES)  # the losses that take label_smoothing

RoundName = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
                      expect("a name of letters, digits, '_', '-', '.'")]
# A data source (pyalign.data.sources): a path string (kept as the resolved path) or a mapping
# {path|name, schema, dimension, split, relabel, on_bad_row, ...}; docs/data.md.
DataSource = Annotated[Any, checked(check_data_source)]


class AdaptiveAlphaConfig(Section):
    """SPO's alphas adapted during each round by dual ascent (pyalign.tasks.preference.adaptive_alpha)."""

    keep: float_type("a fraction in (0, 1]", gt=0, le=1) = field(
        0.9, "threshold H_k: this fraction of dimension k's held-out margin (vs pi_0) at the start of the round")
    every: PositiveInt = field(2, "measure the margins and update the alphas every N optimizer steps")
    step_size: PositiveFloat = field(1.0, "alpha_k += step_size * (H_k - m_k) / |H_k|, clipped to [0, 1]")
    max_pairs: PositiveInt = field(32, "held-out pairs of each earlier dimension measured (the first N)")


class MethodConfig(Section):
    """The preference loss of every round and its coefficients."""

    loss: one_of(*LOSSES) = field("dpo", "preference loss of every round (spo: round 1 is DPO)")
    beta: PositiveFloat = field(0.1, "KL strength beta")
    alpha: one_or_list(UnitInterval) = field(
        0.1, "spo importance of earlier dimensions: one value or one per earlier round")
    adaptive_alpha: AdaptiveAlphaConfig | None = field(
        None, "spo: adapt the alphas during each round by dual ascent {keep, every, step_size, max_pairs} "
              "(pyalign.tasks.preference.adaptive_alpha); null: fixed")
    nll_weight: NonNegativeFloat = field(0.0, "weight of the NLL (SFT) term on chosen responses")
    label_smoothing: Fraction = field(0.0, "label smoothing / noise rate (dpo, robust)")

    def alphas_for_round(self, round_number: int) -> list[float]:
        """alpha_1..alpha_{n-1} for SPO round n (1-based)."""
        if isinstance(self.alpha, list):
            return list(self.alpha[: round_number - 1])
        return [self.alpha] * (round_number - 1)


class RoundConfig(Section):
    """One preference dimension: its pairs to train and evaluate on."""

    name: RoundName = field(doc="the preference dimension's name (folder name)")
    train: DataSource = field(doc="preference pairs to train on: a file/folder path, or a data source mapping "
                                  "(docs/data.md)")
    eval: DataSource | None = field(None, "preference pairs to evaluate on (path or data source)")


class SequentialConfig(Section):
    """``task: preference``: one round of DPO/APO/... per preference dimension; SPO across them."""

    model: ModelConfig = section(ModelConfig, "the starting model pi_0", required=True)
    rounds: Annotated[list[RoundConfig], Field(min_length=1), expect("a non-empty list of {name, train, eval}")] = \
        field(doc="preference dimensions, trained in this order")
    output_dir: PathValue = field(doc="where rounds, checkpoints and caches go")
    lora: LoraConfig | None = section(LoraConfig, "LoRA adapter (null: full fine-tuning, every parameter trained)")
    method: MethodConfig = section(MethodConfig, "loss and its coefficients")
    training: TrainingConfig = section(TrainingConfig, "optimisation")
    cache_dir: PathValue | None = field(None, "frozen log-prob cache (default output_dir/logprob_cache)")
    recompute_stale_cache: Boolean = field(False, "recompute stale cached log-probs instead of refusing")
    reuse_rounds_from: PathValue | None = field(None, "output_dir of another run: its finished rounds whose "
                                                      "fingerprint equals this run's are hard-linked in, not retrained")

    @property
    def logprob_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "logprob_cache"

    def to_dict(self) -> dict:
        return config_to_dict(self)


def check_sequential(config: SequentialConfig) -> None:
    training, method, rounds = config.training, config.method, config.rounds
    check_lengths(training)
    names = [r.name for r in rounds]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"rounds[{i}].name: {name!r} is used twice")
    if isinstance(method.alpha, list) and len(method.alpha) != len(rounds) - 1:
        raise ConfigError(
            f"method.alpha: expected {len(rounds) - 1} values (one per round but the last), "
            f"got {len(method.alpha)}"
        )
    if method.label_smoothing and method.loss not in SMOOTHED_LOSSES:
        raise ConfigError(
            f"method.label_smoothing: only {' and '.join(SMOOTHED_LOSSES)} use it, "
            f"got {method.label_smoothing} with loss {method.loss}"
        )
    if method.loss in SMOOTHED_LOSSES:
        upper, inclusive = SMOOTHING_RANGES[method.loss]
        if method.label_smoothing > upper or (not inclusive and method.label_smoothing == upper):
            interval = f"[0, {upper}]" if inclusive else f"[0, {upper})"
            raise ConfigError(f"method.label_smoothing: {method.loss} needs a value in {interval}, "
                              f"got {method.label_smoothing}")
    if method.adaptive_alpha is not None:
        check_adaptive_alpha(config)
    check_model_folder(config.model)


def check_adaptive_alpha(config) -> None:
    """Cross-field checks of a preference config using adaptive alpha (names the field)."""
    method = config.method
    if method.loss != "spo":
        raise ConfigError(f"method.adaptive_alpha: only the spo loss has alphas, got loss {method.loss}")
    starting = method.alpha if isinstance(method.alpha, list) else [method.alpha]
    if any(a == 0 for a in starting):
        raise ConfigError("method.alpha: adaptive alpha starts from method.alpha and needs it above 0 "
                          f"(a round with every alpha 0 is plain DPO and has no chain to weigh), got {method.alpha}")
    for i, round_config in enumerate(config.rounds[:-1]):
        if round_config.eval is None:
            raise ConfigError(f"rounds[{i}].eval: adaptive alpha measures every earlier dimension on its "
                              "held-out pairs; this round has none")


def round_dir(config: SequentialConfig, round_number: int) -> Path:
    return Path(config.output_dir) / f"round_{round_number}_{config.rounds[round_number - 1].name}"


def round_alphas(config: SequentialConfig, round_number: int) -> list[float]:
    """The alphas round n uses; S-DPO rounds (spo with every alpha 0) use none, since their
    reward beta*log(pi_n/pi_{n-1}) involves only the reference."""
    if config.method.loss != "spo":
        return []
    alphas = config.method.alphas_for_round(round_number)
    return alphas if any(a != 0 for a in alphas) else []


def chain_models(config: SequentialConfig, round_number: int) -> list[int]:
    """Indices i of the frozen models pi_i whose log-probs round n needs (the last is pi_{n-1})."""
    n_models = len(round_alphas(config, round_number)) + 1
    return list(range(round_number - n_models, round_number))
