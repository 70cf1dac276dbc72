"""Training configuration: YAML (or a dict) -> validated pydantic models.

Every field is checked and every error names the field by its path, e.g.
``training.lr: expected a positive float, got -1``; unknown fields are refused by name.
Relative paths are resolved against the current working directory when the config is loaded,
and stored absolute. YAML reads ``1e-5`` as a string (YAML 1.1 wants ``1.0e-5``); float fields
accept such strings.

Here: the sections every task shares (model, lora, training), reading a YAML file, and the
cross-field checks several tasks make. A config's top-level ``task:`` (default ``preference``)
picks its config class from the task registry (:mod:`pyalign.train.registry`, which also loads,
describes and exports the JSON Schema of configs); a task's config is a
:class:`~pyalign.train.config_fields.Section` built from the field types of
:mod:`pyalign.train.config_fields` and the shared sections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, model_validator
from pydantic_core import PydanticCustomError

from pyalign.io import read_text
from pyalign.train.config_fields import (
    Boolean, ConfigError, DeviceName, Fraction, FusedChoice, NonNegativeFloat, NonNegativeInt, PathValue,
    PositiveFloat, PositiveInt, Section, Seed, TargetModules, expect, expected_error, field, non_empty_list, one_of,
)


# ----------------------------------------------------------------------------- shared sections

def _each_once(names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        if name in names[:i]:
            raise expected_error("each tracker once", names)
    return names


ReportTo = Annotated[list[one_of("tensorboard", "wandb", "mlflow")], expect("a list of trackers"),
                     AfterValidator(_each_once)]
PreemptSignals = Annotated[list[one_of("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")], expect("a list of signal names"),
                           AfterValidator(_each_once)]


class ModelConfig(Section):
    """The starting model: a local Hugging Face folder."""

    path: PathValue = field(doc="local HF model folder (weights + tokenizer) of the starting model")
    dtype: one_of("float32", "bfloat16") = field("float32", "weights' dtype in memory and on disk")


class LoraConfig(Section):
    """The LoRA adapter trained on top of the frozen base model (peft)."""

    r: PositiveInt = field(8, "LoRA rank")
    alpha: PositiveFloat = field(32.0, "LoRA scaling numerator (lora_alpha)")
    dropout: Fraction = field(0.0, "LoRA dropout")
    target_modules: TargetModules = field(["q_proj", "v_proj"], "module names, or all-linear")
    trainable_token_indices: non_empty_list(NonNegativeInt) | None = field(
        None, "token ids whose embedding rows are trained too (e.g. newly added tokens)")


class TrainingConfig(Section):
    """Optimisation, precision, devices, checkpoints and logging."""

    lr: PositiveFloat = field(1e-5, "peak learning rate")
    epochs: PositiveInt = field(2, "epochs per round")
    batch_size: PositiveInt = field(4, "examples (pairs) per micro-batch, over all processes together")
    grad_accum: PositiveInt = field(1, "micro-batches per optimizer step")
    eval_batch_size: PositiveInt | None = field(None, "examples per eval/log-prob batch and process (default batch_size)")
    max_length: PositiveInt = field(512, "max tokens of prompt + response")
    max_prompt_length: PositiveInt = field(256, "max prompt tokens (the prompt's tail is kept)")
    warmup_ratio: Fraction = field(0.1, "fraction of steps with linear warm-up")
    lr_scheduler: one_of("linear", "cosine", "constant") = field("linear", "decay after warm-up")
    weight_decay: NonNegativeFloat = field(0.0, "AdamW weight decay")
    max_grad_norm: PositiveFloat | None = field(1.0, "gradient clipping (null: none)")
    seed: Seed = field(0, "seed of LoRA init, data order and dropout, in [0, 2**32)")
    gradient_checkpointing: Boolean = field(False, "recompute activations in backward")
    mixed_precision: one_of("auto", "bf16", "no") = field("auto", "auto: bf16 autocast on CUDA only")
    device: DeviceName = field("auto", "auto, cpu, cuda, cuda:N")
    sharding: one_of("none", "fsdp") = field(
        "none", "none: each process holds the whole model and gradients are all-reduced; fsdp: torch FSDP2 "
                "shards parameters, gradients and optimizer state over the processes (docs/distributed.md)")
    cpu_offload: Boolean = field(False, "sharding fsdp on CUDA: parameters, gradients and optimizer state stay on "
                                        "the CPU between uses")
    num_threads: PositiveInt | None = field(None, "torch CPU threads for the run (null: torch's default)")
    fused_lm_head: FusedChoice = field("auto", "log-probs from hidden states x lm_head without the [B, T, V] logits "
                                               "(auto: when the model allows it, else the logits path with a logged reason)")
    eval_every: NonNegativeInt = field(0, "evaluate every N steps (0: at the end of each round)")
    save_every: NonNegativeInt = field(50, "checkpoint every N steps (0: no mid-round checkpoints)")
    log_every: PositiveInt = field(10, "log every N steps")
    keep_checkpoints: PositiveInt = field(1, "checkpoints kept per round (2: a damaged newest one falls back to the "
                                             "one before)")
    step_limit: PositiveInt = field(1_000_000, "refuse a run of more optimizer steps than this (a guard against typos "
                                               "such as epochs: 1000000000000); raise it for longer runs")
    preempt_signals: PreemptSignals = field(["SIGTERM", "SIGUSR1"], "signals that make the run finish its step, write "
                                                                    "a checkpoint and exit 75 (SIGINT does too, and "
                                                                    "exits 130); [] for none")
    progress_bar: Boolean = field(True, "tqdm progress bars")
    tensorboard: Boolean = field(True, "write tensorboard logs (false alone: report_to [])")
    report_to: ReportTo = field(["tensorboard"], "experiment trackers that get the metrics, config and fingerprint "
                                                 "(process 0): tensorboard, wandb, mlflow; [] for none")

    @model_validator(mode="after")
    def _epochs_within_step_limit(self) -> "TrainingConfig":
        # every epoch is at least one step: caught here, before any model is loaded; the trainer
        # checks the exact count once the data is read
        if self.epochs > self.step_limit:
            raise PydanticCustomError("pyalign", "{message}", {
                "message": f"{self.epochs} epochs make at least as many optimizer steps, above training.step_limit "
                           f"({self.step_limit}); if that many is meant, raise training.step_limit",
                "where": ".epochs"})
        return self

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, data: Any) -> Any:
        """``tensorboard: false`` (the switch before report_to existed) means no tracker."""
        if isinstance(data, dict) and data.get("tensorboard") is False:
            if "report_to" not in data:
                return {**data, "report_to": []}
            if isinstance(data["report_to"], list) and "tensorboard" in data["report_to"]:
                raise PydanticCustomError("pyalign", "{message}", {
                    "message": "false, but training.report_to lists tensorboard (keep one of them)",
                    "where": ".tensorboard"})
        return data


# Fields that change neither what a run computes nor its result: a checkpoint or finished stage
# made with other values of these is still valid.
TRAINING_FIELDS_NOT_IN_FINGERPRINT = (
    "eval_every", "save_every", "log_every", "keep_checkpoints", "progress_bar", "tensorboard", "device",
    "eval_batch_size", "num_threads", "sharding", "cpu_offload", "report_to", "step_limit", "preempt_signals",
)


def lora_fingerprint(lora: LoraConfig | None) -> dict | None:
    """The LoRA settings a result depends on; None for full fine-tuning (``lora: null``)."""
    return None if lora is None else lora.model_dump()


def training_fingerprint(training: TrainingConfig) -> dict:
    return {k: v for k, v in training.model_dump().items() if k not in TRAINING_FIELDS_NOT_IN_FINGERPRINT}


# ----------------------------------------------------------------------------- reading

def _yaml_loader():
    """PyYAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last one
    without a word, so a typo'd second ``lr:`` would silently win)."""
    import yaml  # noqa: PLC0415

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first != key_node.start_mark.line + 1:
                    raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                                      f"(first given on line {first}); keep one of them")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_config_source(source: str | os.PathLike | dict) -> dict:
    """A YAML file or a dict -> a (copied) dict; errors name the file (and the line: a key given
    twice in a mapping is refused, as is a file that is not UTF-8)."""
    if isinstance(source, (str, os.PathLike)):
        import yaml  # noqa: PLC0415

        file = Path(source)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: config file not found")
        try:
            text = read_text(file)
        except ValueError as error:  # not UTF-8: the byte offset
            raise ConfigError(str(error)) from None
        loader = _yaml_loader()(text)
        loader.name = str(file)
        try:
            source = loader.get_single_data()
        except yaml.YAMLError as error:
            raise ConfigError(f"{file}: not valid YAML ({error})") from None
        finally:
            loader.dispose()
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
