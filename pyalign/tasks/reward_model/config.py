"""The config of ``task: reward_model``: a k-objective regression head and a LoRA on a causal LM's
backbone.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, Strict

from pyalign.train import (
    LoraConfig, ModelConfig, PathValue, Section, TrainingConfig, check_file, check_lengths, check_model_folder,
    expect, expected_error, field, float_type, section,
)


def _names_as_mapping(value: Any) -> Any:
    """A list of names means each scale is inferred: ``[a, b]`` -> ``{a: null, b: null}``."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(name, str) and name.strip() for name in value):
            raise expected_error("a non-empty list of objective names", value)
        if len(set(value)) != len(value):
            raise expected_error("distinct objective names", value)
        return {name: None for name in value}
    if not isinstance(value, dict) or not value:
        raise expected_error("a list of objective names or a mapping name -> [low, high]", value)
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise expected_error("objective names that are non-empty strings", name)
    return value


def _low_below_high(bounds: list[float]) -> list[float]:
    if not bounds[0] < bounds[1]:
        raise expected_error("low < high", bounds)
    return bounds


Bounds = Annotated[list[float_type("a finite number")], Field(min_length=2, max_length=2),
                   expect("[low, high] (the input scale mapped to 0-100) or null"), AfterValidator(_low_below_high)]
# Objective names in order, each with the input scale mapped to 0-100 (null: inferred from the
# training ratings); a plain list of names infers every scale.
Objectives = Annotated[dict[Annotated[str, Strict()], Bounds | None], BeforeValidator(_names_as_mapping)]


class RewardDataConfig(Section):
    """The rated examples: JSONL files of {prompt, response, ratings, system?}."""

    train: PathValue = field(doc="JSONL {prompt, response, ratings: {objective: value}, system?}")
    eval: PathValue | None = field(None, "held-out JSONL of the same form (MSE, Pearson r, pairwise accuracy)")


class RewardModelConfig(Section):
    """``task: reward_model``: a k-objective regression head and a LoRA on a causal LM's backbone."""

    model: ModelConfig = section(ModelConfig, "the causal LM whose backbone (without lm_head) reads the texts",
                                 required=True)
    objectives: Objectives = field(doc="objective names in order, or name: [low, high] (input scale mapped to "
                                       "0-100; null: min/max of the training ratings)")
    data: RewardDataConfig = section(RewardDataConfig, "the rated examples", required=True)
    output_dir: PathValue = field(doc="where checkpoints and the reward model folder go")
    lora: LoraConfig | None = section(LoraConfig, "LoRA on the backbone, the head trained in full (null: the whole "
                                                             "backbone is trained)")
    training: TrainingConfig = section(TrainingConfig, "optimisation")


def check_reward_model(config: RewardModelConfig) -> None:
    check_lengths(config.training)
    check_model_folder(config.model)
    check_file("data.train", config.data.train)
    check_file("data.eval", config.data.eval)
