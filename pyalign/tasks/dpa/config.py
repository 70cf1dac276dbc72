"""The ``task: dpa`` config: Directional Preference Alignment by rejection sampling.

Built from the shared pieces of :mod:`pyalign.train.config` (every field checked alone, errors
name the field; unknown fields refused); :func:`check_dpa` checks values that must agree with
each other and with the reward model on disk. docs/dpa.md has the reference with defaults and
why.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Annotated, Callable

from pydantic import AfterValidator, Field

from pyalign.directions import PROMPT_STYLES, SIGNS, check_objectives
from pyalign.tasks.preference.config import MethodConfig
from pyalign.train import (
    Boolean, ConfigError, Fraction, LoraConfig, ModelConfig, NonNegativeInt, PathValue, PositiveFloat,
    PositiveInt, Section, Seed, String, TrainingConfig, check_file, check_lengths, check_model_folder, checked, expect,
    expected_error, field, float_type, non_empty_list, one_of, section,
)

PAIRWISE_LOSSES = ("dpo", "ipo", "hinge", "robust", "apo_zero", "apo_down", "kto_pair")
FINE_TUNES = ("sft", "pairwise")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


# ----------------------------------------------------------------------------- field types

def _objective_names(path, value):
    return check_objectives(value, name=path)


def _some_sign_not_zero(signs: list[str]) -> list[str]:
    if all(sign == "0" for sign in signs):
        raise expected_error("at least one sign that is not '0'", signs)
    return signs


def _angles_in_order(value: list[float]) -> list[float]:
    low, high = value
    if low > high or high - low > 2 * math.pi:
        raise expected_error("low <= high, at most 2*pi apart", value)
    return value


def _non_zero(vector: list[float]) -> list[float]:
    if not any(vector):
        raise expected_error("a direction with a non-zero norm", vector)
    return vector


def python_callable(path, value):
    """``"package.module:function"``; imported when the config is checked."""
    if not isinstance(value, str) or not _CALLABLE.fullmatch(value):
        raise ConfigError(f"{path}: expected 'package.module:function', got {value!r}")
    resolve_callable(path, value)
    return value


def resolve_callable(path: str, value: str) -> Callable:
    module_name, function_name = value.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{path}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{path}: {module_name} has no function {function_name!r}")
    return function


ObjectiveNames = Annotated[list[str], checked(_objective_names)]
Signs = Annotated[non_empty_list(one_of(*SIGNS)), AfterValidator(_some_sign_not_zero)]
AngleRange = Annotated[list[float_type("a number of radians")], Field(min_length=2, max_length=2),
                       expect("[low, high] in radians"), AfterValidator(_angles_in_order)]
# Explicit directions: non-zero vectors (their lengths are checked against the objectives later).
Vectors = non_empty_list(Annotated[non_empty_list(float_type("a number")), AfterValidator(_non_zero)])
TopP = float_type("a number in (0, 1]", gt=0, le=1)
PythonCallable = Annotated[str, checked(python_callable)]


# ----------------------------------------------------------------------------- sections

class PromptsConfig(Section):
    """The prompt files."""

    train: PathValue = field(doc="JSONL {prompt, system?, response?, ...}: the prompts, split in two halves used in "
                                 "turn (iteration 1: first half)")
    eval: PathValue | None = field(None, "JSONL held-out prompts for the empirical front (null: no evaluation)")
    replay: PathValue | None = field(None, "JSONL {prompt, response, system?} original responses to replay "
                                           "(null: the train rows that have a response)")
    per_iteration: PositiveInt | None = field(None, "prompts of the half used per iteration (null: all)")


class DirectionsConfig(Section):
    """The training directions sampled per prompt."""

    per_prompt: PositiveInt = field(5, "m: directions sampled per prompt (paper: 5)")
    sampler: one_of("angle", "sphere") = field(
        "angle", "angle: 2 objectives, angle uniform in angle_range; sphere: k objectives, uniform where each "
                 "component has its sign")
    angle_range: AngleRange = field([-math.pi / 4, 0.0], "radians, [low, high] (paper: [-pi/4, 0])")
    signs: Signs | None = field(None, "sphere: one of +, -, 0, any per objective")
    system_prefix: String = field("", "text before 'maximize weighted rating = ...' in the system prompt")
    prompt_style: one_of(*PROMPT_STYLES) = field(
        "paper", "paper: only 'maximize weighted rating = helpfulness*71 + verbosity*-71'; words: the same "
                 "weights also in words before it ('Aim for more helpfulness and much less verbosity.')")


class SamplingConfig(Section):
    """Rejection sampling: n samples per (prompt, direction)."""

    n: PositiveInt = field(16, "samples per (prompt, direction) (paper: 16)")
    max_new_tokens: PositiveInt = field(256, "tokens per sample at most")
    temperature: PositiveFloat = field(1.0, "sampling temperature (paper: 1.0)")
    top_p: TopP = field(1.0, "nucleus mass in (0, 1]")
    top_k: NonNegativeInt = field(0, "top-k (0: off)")
    batch_size: PositiveInt = field(16, "rows per generation batch")
    chunk_size: PositiveInt = field(64, "(prompt, direction) rows generated between two saves")
    seed: Seed = field(0, "seed of directions, samples and replay draws")
    backend: one_of("auto", "hf", "vllm") = field("auto", "generation backend (auto: vllm when importable)")


class LoopConfig(Section):
    """The iterations: sample, score, select, fine-tune."""

    iterations: PositiveInt = field(2, "T: rejection-sampling + fine-tuning iterations (paper: 4)")
    restart_from_base: Boolean = field(True, "fine-tune each iteration from model.path (paper) instead of the "
                                             "previous iteration's model")
    fine_tune: one_of(*FINE_TUNES) = field(
        "sft", "sft: NLL on the best sample per (prompt, v) (the paper); pairwise: method.loss on best-vs-worst pairs")
    replay_fraction: Fraction = field(0.15, "share of original responses in each SFT set (paper: ~15%)")
    score_batch_size: PositiveInt = field(16, "responses per reward-model batch")


class EvaluationConfig(Section):
    """The empirical front: mean rewards along evaluation directions."""

    directions: PositiveInt = field(10, "evenly spaced directions over angle_range (2 objectives)")
    angle_range: AngleRange = field([-math.pi / 4, 0.0], "from <cos hi, sin hi> to <cos lo, sin lo>")
    vectors: Vectors | None = field(None, "explicit evaluation directions instead (any k)")
    samples_per_prompt: PositiveInt = field(2, "samples per (prompt, direction) (paper: 2)")
    temperature: PositiveFloat = field(0.7, "paper: 0.7")
    top_p: TopP = field(1.0, "nucleus mass in (0, 1]")
    max_new_tokens: PositiveInt | None = field(None, "default: sampling.max_new_tokens")
    seed: Seed = field(1234, "seed of the evaluation samples")
    true_ratings: PythonCallable | None = field(
        None, "'module:function'(row, response, tokenizer) -> {objective: rating on the reward model's input "
              "scale}: the task's true objectives, if it has them")
    control_objective: String | None = field(None, "objective of the arithmetic-control check (default: the last)")


class DPAConfig(Section):
    """``task: dpa``: Directional Preference Alignment (rejection sampling against a k-objective
    reward model, fine-tuning on the best sample per preference direction)."""

    model: ModelConfig = section(ModelConfig, "the starting policy pi_0", required=True)
    reward_model: PathValue = field(doc="folder of a pyalign reward model (pyalign train, task reward_model)")
    objectives: ObjectiveNames = field(doc="objective names, the order of v's components; must be the reward "
                                           "model's")
    prompts: PromptsConfig = section(PromptsConfig, "prompt files", required=True)
    output_dir: PathValue = field(doc="where iterations, samples, models and the front go")
    directions: DirectionsConfig = section(DirectionsConfig, "training directions")
    sampling: SamplingConfig = section(SamplingConfig, "rejection sampling")
    loop: LoopConfig = section(LoopConfig, "the iterations")
    method: MethodConfig = section(MethodConfig, "pairwise fine-tune: loss and beta (loop.fine_tune: pairwise)")
    lora: LoraConfig | None = section(LoraConfig, "LoRA of each fine-tune (null: full fine-tuning)")
    training: TrainingConfig = section(TrainingConfig, "optimisation of each fine-tune")
    evaluation: EvaluationConfig = section(EvaluationConfig, "the empirical front")


def check_dpa(config: DPAConfig) -> None:
    """Cross-field checks (each field was checked alone already)."""
    check_lengths(config.training)
    check_model_folder(config.model)
    for name in ("train", "eval", "replay"):
        check_file(f"prompts.{name}", getattr(config.prompts, name))
    k = len(config.objectives)
    directions = config.directions
    if directions.sampler == "angle" and k != 2:
        raise ConfigError(f"directions.sampler: angle needs 2 objectives, got {k} ({', '.join(config.objectives)}); "
                          "use sampler: sphere with signs")
    if directions.sampler == "sphere":
        if directions.signs is None:
            raise ConfigError(f"directions.signs: sampler sphere needs one sign per objective ({k})")
        if len(directions.signs) != k:
            raise ConfigError(f"directions.signs: expected {k} entries (one per objective), got {len(directions.signs)}")
    evaluation = config.evaluation
    if evaluation.vectors is not None:
        for i, vector in enumerate(evaluation.vectors):
            if len(vector) != k:
                raise ConfigError(f"evaluation.vectors[{i}]: expected {k} components (one per objective), "
                                  f"got {len(vector)}")
    elif k != 2:
        raise ConfigError(f"evaluation.vectors: with {k} objectives give the evaluation directions explicitly")
    elif evaluation.directions < 2:
        raise ConfigError(f"evaluation.directions: expected at least 2, got {evaluation.directions}")
    if evaluation.control_objective is not None and evaluation.control_objective not in config.objectives:
        raise ConfigError(f"evaluation.control_objective: expected one of {config.objectives}, "
                          f"got {evaluation.control_objective!r}")
    if config.loop.fine_tune == "pairwise":
        if config.method.loss not in PAIRWISE_LOSSES:
            raise ConfigError(f"method.loss: the pairwise fine-tune takes one of {', '.join(PAIRWISE_LOSSES)}, "
                              f"got {config.method.loss!r}")
        if config.sampling.n < 2:
            raise ConfigError("sampling.n: the pairwise fine-tune needs at least 2 samples per (prompt, direction) "
                              f"to pair the best with the worst, got {config.sampling.n}")
    check_reward_model_objectives(config.reward_model, config.objectives)


def check_reward_model_objectives(folder: str, objectives: list[str]) -> None:
    """The reward model's objectives, read from its folder's metadata, must be ``objectives`` in
    order (the order gives each component of a direction its meaning)."""
    from pyalign.io import read_json  # noqa: PLC0415
    from pyalign.reward_model.model import CONFIG_FILE  # noqa: PLC0415

    meta_file = Path(folder) / CONFIG_FILE
    if not meta_file.is_file():
        raise ConfigError(f"reward_model: {folder} is not a pyalign reward model folder (no {CONFIG_FILE})")
    names = [o.get("name") for o in read_json(meta_file).get("objectives", [])]
    if names != list(objectives):
        raise ConfigError(f"objectives: the reward model {folder} predicts {names}, the config says "
                          f"{list(objectives)} (same names, same order)")
