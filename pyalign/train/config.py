"""Training configuration: YAML (or a dict) -> validated dataclasses.

Every field is checked and every error names the field by its path, e.g.
``training.lr: expected a positive float, got -1``; unknown fields are refused by name.
Relative paths are resolved against the current working directory when the config is loaded,
and stored absolute. YAML reads ``1e-5`` as a string (YAML 1.1 wants ``1.0e-5``); float fields
accept such strings.

Here: the sections every task shares (model, lora, training), reading a YAML file, and the
cross-field checks several tasks make. A config's top-level ``task:`` (default ``preference``)
picks its dataclass from the task registry (:mod:`pyalign.train.registry`, which also loads and
describes configs); a task's dataclass is built from the pieces of
:mod:`pyalign.train.config_fields` and the shared sections.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyalign.train.config_fields import (
    ConfigError,
    _field,
    boolean,
    choice,
    device_name,
    fraction,
    fused_choice,
    integer,
    list_of,
    non_negative_float,
    non_negative_int,
    optional,
    path_value,
    positive_float,
    positive_int,
    target_modules,
)

# ----------------------------------------------------------------------------- shared sections

@dataclass
class ModelConfig:
    path: str = _field(check=path_value, doc="local HF model folder (weights + tokenizer) of the starting model")
    dtype: str = _field("float32", choice("float32", "bfloat16"), "weights' dtype in memory and on disk")


@dataclass
class LoraConfig:
    r: int = _field(8, positive_int, "LoRA rank")
    alpha: float = _field(32.0, positive_float, "LoRA scaling numerator (lora_alpha)")
    dropout: float = _field(0.0, fraction, "LoRA dropout")
    target_modules: Any = _field(["q_proj", "v_proj"], target_modules, "module names, or all-linear")
    trainable_token_indices: Any = _field(
        None, optional(list_of(non_negative_int)),
        "token ids whose embedding rows are trained too (e.g. newly added tokens)",
    )


@dataclass
class TrainingConfig:
    lr: float = _field(1e-5, positive_float, "peak learning rate")
    epochs: int = _field(2, positive_int, "epochs per round")
    batch_size: int = _field(4, positive_int,
                             "examples (pairs) per micro-batch, over all processes together")
    grad_accum: int = _field(1, positive_int, "micro-batches per optimizer step")
    eval_batch_size: Any = _field(None, optional(positive_int),
                                  "examples per eval/log-prob batch and process (default batch_size)")
    max_length: int = _field(512, positive_int, "max tokens of prompt + response")
    max_prompt_length: int = _field(256, positive_int, "max prompt tokens (the prompt's tail is kept)")
    warmup_ratio: float = _field(0.1, fraction, "fraction of steps with linear warm-up")
    lr_scheduler: str = _field("linear", choice("linear", "cosine", "constant"), "decay after warm-up")
    weight_decay: float = _field(0.0, non_negative_float, "AdamW weight decay")
    max_grad_norm: Any = _field(1.0, optional(positive_float), "gradient clipping (null: none)")
    seed: int = _field(0, integer, "seed of LoRA init, data order and dropout")
    gradient_checkpointing: bool = _field(False, boolean, "recompute activations in backward")
    mixed_precision: str = _field("auto", choice("auto", "bf16", "no"), "auto: bf16 autocast on CUDA only")
    device: str = _field("auto", device_name, "auto, cpu, cuda, cuda:N")
    num_threads: Any = _field(None, optional(positive_int), "torch CPU threads for the run (null: torch's default)")
    fused_lm_head: Any = _field("auto", fused_choice,
                                "log-probs from hidden states x lm_head without the [B, T, V] logits "
                                "(auto: when the model allows it, else the logits path with a logged reason)")
    eval_every: int = _field(0, non_negative_int, "evaluate every N steps (0: at the end of each round)")
    save_every: int = _field(50, non_negative_int, "checkpoint every N steps (0: no mid-round checkpoints)")
    log_every: int = _field(10, positive_int, "log every N steps")
    keep_checkpoints: int = _field(1, positive_int, "checkpoints kept per round")
    progress_bar: bool = _field(True, boolean, "tqdm progress bars")
    tensorboard: bool = _field(True, boolean, "write tensorboard logs")


# Fields that change neither what a run computes nor its result: a checkpoint or finished stage
# made with other values of these is still valid.
TRAINING_FIELDS_NOT_IN_FINGERPRINT = (
    "eval_every", "save_every", "log_every", "keep_checkpoints", "progress_bar", "tensorboard", "device",
    "eval_batch_size", "num_threads",
)


def training_fingerprint(training: TrainingConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(training).items() if k not in TRAINING_FIELDS_NOT_IN_FINGERPRINT}


# ----------------------------------------------------------------------------- reading

def read_config_source(source: str | os.PathLike | dict) -> dict:
    """A YAML file or a dict -> a (copied) dict; errors name the file."""
    if isinstance(source, (str, os.PathLike)):
        import yaml  # noqa: PLC0415

        file = Path(source)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: config file not found")
        with file.open(encoding="utf-8") as handle:
            try:
                source = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise ConfigError(f"{file}: not valid YAML ({error})") from None
    if not isinstance(source, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(source).__name__}")
    return dict(source)


# ----------------------------------------------------------------------------- cross-field checks

def check_lengths(training: TrainingConfig) -> None:
    if training.max_prompt_length >= training.max_length:
        raise ConfigError(
            f"training.max_prompt_length: must be below training.max_length={training.max_length} "
            f"(the response needs room), got {training.max_prompt_length}"
        )


def check_model_folder(model: ModelConfig, where: str = "model") -> None:
    if not Path(model.path).is_dir():
        raise ConfigError(f"{where}.path: no such model folder: {model.path}")


def check_file(where: str, file: str | None) -> None:
    if file is not None and not Path(file).is_file():
        raise ConfigError(f"{where}: file not found: {file}")




def __getattr__(name: str):
    # The preference task's sections and load_config moved (pyalign.tasks.preference.config,
    # pyalign.train.registry): found there, with a DeprecationWarning.
    from pyalign._deprecated import moved_attribute  # noqa: PLC0415

    return moved_attribute(__name__, name)
