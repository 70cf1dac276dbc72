"""The config of ``task: sft``: supervised fine-tuning of a LoRA on (prompt, response) examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyalign.train import (
    LoraConfig,
    ModelConfig,
    TrainingConfig,
    _field,
    check_file,
    check_lengths,
    check_model_folder,
    optional,
    path_value,
    section,
)


@dataclass
class SFTDataConfig:
    train: str = _field(check=path_value, doc="JSONL {prompt, response, system?} examples to train on")
    eval: Any = _field(None, optional(path_value), "JSONL examples to evaluate on (NLL per token, perplexity)")


@dataclass
class SFTConfig:
    """``task: sft``: supervised fine-tuning of a LoRA on (prompt, response) examples."""

    model: ModelConfig = section(ModelConfig, "the model to fine-tune", required=True)
    data: SFTDataConfig = section(SFTDataConfig, "the examples", required=True)
    output_dir: str = _field(check=path_value, doc="where checkpoints, the adapter and the merged model go")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter")
    training: TrainingConfig = section(TrainingConfig, "optimisation")


def check_sft(config: SFTConfig) -> None:
    check_lengths(config.training)
    check_model_folder(config.model)
    check_file("data.train", config.data.train)
    check_file("data.eval", config.data.eval)
