"""The config of ``task: reward_model``: a k-objective regression head and a LoRA on a causal LM's
backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyalign.train import (
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    _fail,
    _field,
    _number,
    check_file,
    check_lengths,
    check_model_folder,
    optional,
    path_value,
    section,
)


def objectives_spec(path: str, value: Any) -> dict[str, list[float] | None]:
    """A list of names (scales inferred from the training ratings) or a mapping
    ``name -> [low, high]`` (``null``: inferred); normalised to the mapping, order kept."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(name, str) and name.strip() for name in value):
            raise _fail(path, "a non-empty list of objective names", value)
        if len(set(value)) != len(value):
            raise _fail(path, "distinct objective names", value)
        return {name: None for name in value}
    if not isinstance(value, dict) or not value:
        raise _fail(path, "a list of objective names or a mapping name -> [low, high]", value)
    spec = {}
    for name, bounds in value.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, "objective names that are non-empty strings", name)
        if bounds is None:
            spec[name] = None
            continue
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise _fail(where, "[low, high] (the input scale mapped to 0-100) or null", bounds)
        low, high = (_number(f"{where}[{i}]", b, "a finite number") for i, b in enumerate(bounds))
        if not low < high:
            raise _fail(where, "low < high", bounds)
        spec[name] = [low, high]
    return spec


@dataclass
class RewardDataConfig:
    train: str = _field(check=path_value, doc="JSONL {prompt, response, ratings: {objective: value}, system?}")
    eval: Any = _field(None, optional(path_value), "held-out JSONL of the same form (MSE, Pearson r, pairwise accuracy)")


@dataclass
class RewardModelConfig:
    """``task: reward_model``: a k-objective regression head and a LoRA on a causal LM's backbone."""

    model: ModelConfig = section(ModelConfig, "the causal LM whose backbone (without lm_head) reads the texts",
                                 required=True)
    objectives: Any = _field(check=objectives_spec,
                             doc="objective names in order, or name: [low, high] (input scale mapped to 0-100; "
                                 "null: min/max of the training ratings)")
    data: RewardDataConfig = section(RewardDataConfig, "the rated examples", required=True)
    output_dir: str = _field(check=path_value, doc="where checkpoints and the reward model folder go")
    lora: LoraConfig = section(LoraConfig, "LoRA on the backbone (the head is trained in full)")
    training: TrainingConfig = section(TrainingConfig, "optimisation")


def check_reward_model(config: RewardModelConfig) -> None:
    check_lengths(config.training)
    check_model_folder(config.model)
    check_file("data.train", config.data.train)
    check_file("data.eval", config.data.eval)
