"""The config of ``task: sft``: supervised fine-tuning of a LoRA on (prompt, response) examples."""

from __future__ import annotations

from pyalign.train import (
    LoraConfig, ModelConfig, PathValue, Section, TrainingConfig, check_file, check_lengths, check_model_folder,
    field, section,
)


class SFTDataConfig(Section):
    """The examples: JSONL files of {prompt, response, system?}."""

    train: PathValue = field(doc="JSONL {prompt, response, system?} examples to train on")
    eval: PathValue | None = field(None, "JSONL examples to evaluate on (NLL per token, perplexity)")


class SFTConfig(Section):
    """``task: sft``: supervised fine-tuning of a LoRA on (prompt, response) examples."""

    model: ModelConfig = section(ModelConfig, "the model to fine-tune", required=True)
    data: SFTDataConfig = section(SFTDataConfig, "the examples", required=True)
    output_dir: PathValue = field(doc="where checkpoints, the adapter and the merged model go")
    lora: LoraConfig | None = section(LoraConfig, "LoRA adapter (null: full fine-tuning, every parameter trained)")
    training: TrainingConfig = section(TrainingConfig, "optimisation")


def check_sft(config: SFTConfig) -> None:
    check_lengths(config.training)
    check_model_folder(config.model)
    check_file("data.train", config.data.train)
    check_file("data.eval", config.data.eval)
