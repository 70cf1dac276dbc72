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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyalign.directions import SIGNS, check_objectives
from pyalign.tasks.preference.config import MethodConfig
from pyalign.train import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    _fail,
    _field,
    _number,
    boolean,
    check_file,
    check_lengths,
    check_model_folder,
    choice,
    fraction,
    integer,
    list_of,
    optional,
    path_value,
    positive_float,
    positive_int,
    section,
)

PAIRWISE_LOSSES = ("dpo", "ipo", "hinge", "robust", "apo_zero", "apo_down", "kto_pair")
FINE_TUNES = ("sft", "pairwise")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


# ----------------------------------------------------------------------------- field checks

def objective_names(path, value):
    try:
        return check_objectives(value, name=path)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def string(path, value):
    if not isinstance(value, str):
        raise _fail(path, "a string", value)
    return value


def sign_list(path, value):
    values = list_of(choice(*SIGNS))(path, value)
    if all(v == "0" for v in values):
        raise _fail(path, "at least one sign that is not '0'", value)
    return values


def angle_range(path, value):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(path, "[low, high] in radians", value)
    low, high = (_number(f"{path}[{i}]", v, "a number of radians") for i, v in enumerate(value))
    if low > high or high - low > 2 * math.pi:
        raise _fail(path, "low <= high, at most 2*pi apart", value)
    return [low, high]


def vector_list(path, value):
    """Explicit directions: a list of non-zero vectors (lengths checked against objectives later)."""
    vectors = list_of(list_of(lambda p, v: _number(p, v, "a number")))(path, value)
    for i, vector in enumerate(vectors):
        if not any(vector):
            raise _fail(f"{path}[{i}]", "a direction with a non-zero norm", vector)
    return vectors


def python_callable(path, value):
    """``"package.module:function"``; imported when the config is checked."""
    if not isinstance(value, str) or not _CALLABLE.fullmatch(value):
        raise _fail(path, "'package.module:function'", value)
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


# ----------------------------------------------------------------------------- sections

@dataclass
class PromptsConfig:
    train: str = _field(check=path_value, doc="JSONL {prompt, system?, response?, ...}: the prompts, split in two "
                                              "halves used in turn (iteration 1: first half)")
    eval: Any = _field(None, optional(path_value), "JSONL held-out prompts for the empirical front (null: no evaluation)")
    replay: Any = _field(None, optional(path_value),
                         "JSONL {prompt, response, system?} original responses to replay "
                         "(null: the train rows that have a response)")
    per_iteration: Any = _field(None, optional(positive_int), "prompts of the half used per iteration (null: all)")


@dataclass
class DirectionsConfig:
    per_prompt: int = _field(5, positive_int, "m: directions sampled per prompt (paper: 5)")
    sampler: str = _field("angle", choice("angle", "sphere"),
                          "angle: 2 objectives, angle uniform in angle_range; sphere: k objectives, uniform "
                          "where each component has its sign")
    angle_range: list = _field([-math.pi / 4, 0.0], angle_range, "radians, [low, high] (paper: [-pi/4, 0])")
    signs: Any = _field(None, optional(sign_list), "sphere: one of +, -, 0, any per objective")
    system_prefix: str = _field("", string, "text before 'maximize weighted rating = ...' in the system prompt")


@dataclass
class SamplingConfig:
    n: int = _field(16, positive_int, "samples per (prompt, direction) (paper: 16)")
    max_new_tokens: int = _field(256, positive_int, "tokens per sample at most")
    temperature: float = _field(1.0, positive_float, "sampling temperature (paper: 1.0)")
    top_p: float = _field(1.0, lambda p, v: _unit_open(p, v), "nucleus mass in (0, 1]")
    top_k: int = _field(0, lambda p, v: _non_negative(p, v), "top-k (0: off)")
    batch_size: int = _field(16, positive_int, "rows per generation batch")
    chunk_size: int = _field(64, positive_int, "(prompt, direction) rows generated between two saves")
    seed: int = _field(0, integer, "seed of directions, samples and replay draws")
    backend: str = _field("auto", choice("auto", "hf", "vllm"), "generation backend (auto: vllm when importable)")


def _unit_open(path, value):
    number = _number(path, value, "a number in (0, 1]")
    if not 0 < number <= 1:
        raise _fail(path, "a number in (0, 1]", value)
    return number


def _non_negative(path, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, "a non-negative integer", value)
    return value


@dataclass
class LoopConfig:
    iterations: int = _field(2, positive_int, "T: rejection-sampling + fine-tuning iterations (paper: 4)")
    restart_from_base: bool = _field(True, boolean, "fine-tune each iteration from model.path (paper) instead "
                                                    "of the previous iteration's model")
    fine_tune: str = _field("sft", choice(*FINE_TUNES),
                            "sft: NLL on the best sample per (prompt, v) (the paper); pairwise: method.loss on "
                            "best-vs-worst pairs")
    replay_fraction: float = _field(0.15, fraction, "share of original responses in each SFT set (paper: ~15%)")
    score_batch_size: int = _field(16, positive_int, "responses per reward-model batch")


@dataclass
class EvaluationConfig:
    directions: int = _field(10, positive_int, "evenly spaced directions over angle_range (2 objectives)")
    angle_range: list = _field([-math.pi / 4, 0.0], angle_range, "from <cos hi, sin hi> to <cos lo, sin lo>")
    vectors: Any = _field(None, optional(vector_list), "explicit evaluation directions instead (any k)")
    samples_per_prompt: int = _field(2, positive_int, "samples per (prompt, direction) (paper: 2)")
    temperature: float = _field(0.7, positive_float, "paper: 0.7")
    top_p: float = _field(1.0, lambda p, v: _unit_open(p, v), "nucleus mass in (0, 1]")
    max_new_tokens: Any = _field(None, optional(positive_int), "default: sampling.max_new_tokens")
    seed: int = _field(1234, integer, "seed of the evaluation samples")
    true_ratings: Any = _field(None, optional(python_callable),
                               "'module:function'(row, response, tokenizer) -> {objective: rating on the "
                               "reward model's input scale}: the task's true objectives, if it has them")
    control_objective: Any = _field(None, optional(string), "objective of the arithmetic-control check "
                                                            "(default: the last)")


@dataclass
class DPAConfig:
    """``task: dpa``: Directional Preference Alignment (rejection sampling against a k-objective
    reward model, fine-tuning on the best sample per preference direction)."""

    model: ModelConfig = section(ModelConfig, "the starting policy pi_0", required=True)
    reward_model: str = _field(check=path_value, doc="folder of a pyalign reward model (pyalign train, task reward_model)")
    objectives: list = _field(check=objective_names, doc="objective names, the order of v's components; must be "
                                                         "the reward model's")
    prompts: PromptsConfig = section(PromptsConfig, "prompt files", required=True)
    output_dir: str = _field(check=path_value, doc="where iterations, samples, models and the front go")
    directions: DirectionsConfig = section(DirectionsConfig, "training directions")
    sampling: SamplingConfig = section(SamplingConfig, "rejection sampling")
    loop: LoopConfig = section(LoopConfig, "the iterations")
    method: MethodConfig = section(MethodConfig, "pairwise fine-tune: loss and beta (loop.fine_tune: pairwise)")
    lora: LoraConfig = section(LoraConfig, "LoRA of each fine-tune")
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
