"""Training configuration: YAML (or a dict) -> validated dataclasses.

Every field is checked and every error names the field by its path, e.g.
``training.lr: expected a positive float, got -1``; unknown fields are refused by name.
Relative paths are resolved against the current working directory when the config is loaded,
and stored absolute. YAML reads ``1e-5`` as a string (YAML 1.1 wants ``1.0e-5``); float fields
accept such strings.

A config's top-level ``task:`` (default ``preference``) picks its dataclass from the task
registry (:mod:`pyalign.train.tasks`); a task's dataclass is built from the same pieces as the
preference one: :func:`_field` with a check, :func:`section` for a nested dataclass,
:func:`section_list` for a list of them, and the shared sections below (model, lora, training).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LOSSES = ("dpo", "ipo", "hinge", "robust", "apo_zero", "apo_down", "kto_pair", "spo")
SMOOTHED_LOSSES = ("dpo", "robust")  # the losses that take label_smoothing


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the field's path."""


# ----------------------------------------------------------------------------- field checks
# Each check takes (path, value) and returns the normalised value or raises ConfigError.

def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _number(path: str, value: Any, expected: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(path, expected, value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, expected, value)
    return float(value)


def positive_float(path, value):
    number = _number(path, value, "a positive float")
    if number <= 0:
        raise _fail(path, "a positive float", value)
    return number


def non_negative_float(path, value):
    number = _number(path, value, "a non-negative float")
    if number < 0:
        raise _fail(path, "a non-negative float", value)
    return number


def fraction(path, value):
    """A float in [0, 1)."""
    number = _number(path, value, "a float in [0, 1)")
    if not 0 <= number < 1:
        raise _fail(path, "a float in [0, 1)", value)
    return number


def unit_interval(path, value):
    """A float in [0, 1]."""
    number = _number(path, value, "a float in [0, 1]")
    if not 0 <= number <= 1:
        raise _fail(path, "a float in [0, 1]", value)
    return number


def integer(path, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "an integer", value)
    return value


def positive_int(path, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, "a positive integer", value)
    return value


def non_negative_int(path, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, "a non-negative integer", value)
    return value


def boolean(path, value):
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def choice(*options: str) -> Callable:
    def check(path, value):
        if value not in options:
            raise _fail(path, "one of " + ", ".join(options), value)
        return value
    return check


def fused_choice(path, value):
    if value not in ("auto", True, False):
        raise _fail(path, "auto, true or false", value)
    return value


def text(path, value):
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "a non-empty string", value)
    return value


def path_value(path, value):
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _fail(path, "a path", value)
    return str(Path(value).expanduser().resolve())


def optional(check: Callable) -> Callable:
    def check_optional(path, value):
        return None if value is None else check(path, value)
    return check_optional


def list_of(check: Callable, *, non_empty: bool = True) -> Callable:
    def check_list(path, value):
        if not isinstance(value, (list, tuple)) or (non_empty and not value):
            raise _fail(path, "a non-empty list" if non_empty else "a list", value)
        return [check(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return check_list


def device_name(path, value):
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _fail(path, "auto, cpu, cuda or cuda:N", value)
    return value


def target_modules(path, value):
    if value == "all-linear":
        return value
    return list_of(text)(path, value)


def alpha_value(path, value):
    """One alpha for every earlier round, or a list (checked against the rounds later)."""
    if isinstance(value, (list, tuple)):
        return [unit_interval(f"{path}[{i}]", a) for i, a in enumerate(value)]
    return unit_interval(path, value)


def round_name(path, value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise _fail(path, "a name of letters, digits, '_', '-', '.'", value)
    return value


def _field(default=dataclasses.MISSING, check: Callable = None, doc: str = "", **metadata):
    """A dataclass field with its check and one-line documentation."""
    kwargs = {"metadata": {"check": check, "doc": doc, **metadata}}
    if isinstance(default, type):  # a section: its own defaults
        kwargs["default_factory"] = default
    elif isinstance(default, list):
        kwargs["default_factory"] = lambda d=default: list(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


def section(cls, doc: str = "", *, required: bool = False):
    """A field holding the nested dataclass ``cls`` (built from its own defaults when the
    config leaves it out, unless ``required``)."""
    def check(path, value):
        return _build(cls, {} if value is None else value, path)
    return _field(dataclasses.MISSING if required else cls, check, doc, section=cls)


def section_list(cls, doc: str = ""):
    """A required, non-empty list of ``cls`` dataclasses (e.g. ``rounds``)."""
    def check(path, value):
        if not isinstance(value, list) or not value:
            names = ", ".join(f.name for f in dataclasses.fields(cls))
            raise _fail(path, f"a non-empty list of {{{names}}}", value)
        return [_build(cls, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return _field(check=check, doc=doc, items=cls)


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


# ----------------------------------------------------------------------------- the preference task

@dataclass
class MethodConfig:
    loss: str = _field("dpo", choice(*LOSSES), "preference loss of every round (spo: round 1 is DPO)")
    beta: float = _field(0.1, positive_float, "KL strength beta")
    alpha: Any = _field(0.1, alpha_value, "spo importance of earlier dimensions: one value or one per earlier round")
    adaptive_alpha: Any = _field(None, lambda path, value: _adaptive_alpha_setting(path, value),
                                 "spo: adapt the alphas during each round by dual ascent "
                                 "{keep, every, step_size, max_pairs} (pyalign.train.adaptive_alpha); null: fixed")
    nll_weight: float = _field(0.0, non_negative_float, "weight of the NLL (SFT) term on chosen responses")
    label_smoothing: float = _field(0.0, fraction, "label smoothing / noise rate (dpo, robust)")

    def alphas_for_round(self, round_number: int) -> list[float]:
        """alpha_1..alpha_{n-1} for SPO round n (1-based)."""
        if isinstance(self.alpha, list):
            return list(self.alpha[: round_number - 1])
        return [self.alpha] * (round_number - 1)


def _adaptive_alpha_setting(path, value):
    from pyalign.train.adaptive_alpha import adaptive_alpha_setting  # noqa: PLC0415

    return adaptive_alpha_setting(path, value)


def data_source(path, value):
    """A data source (:mod:`pyalign.data.sources`): a path string (kept as the resolved path) or
    a mapping {path|name, schema, dimension, split, relabel, on_bad_row, ...}; docs/data.md."""
    from pyalign.data.sources import check_data_source  # noqa: PLC0415

    try:
        return check_data_source(path, value)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class RoundConfig:
    name: str = _field(check=round_name, doc="the preference dimension's name (folder name)")
    train: Any = _field(check=data_source, doc="preference pairs to train on: a file/folder path, or a data "
                                                "source mapping (docs/data.md)")
    eval: Any = _field(None, optional(data_source), "preference pairs to evaluate on (path or data source)")


@dataclass
class SequentialConfig:
    """``task: preference``: one round of DPO/APO/... per preference dimension; SPO across them."""

    model: ModelConfig = section(ModelConfig, "the starting model pi_0", required=True)
    rounds: list = section_list(RoundConfig, "preference dimensions, trained in this order")
    output_dir: str = _field(check=path_value, doc="where rounds, checkpoints and caches go")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter")
    method: MethodConfig = section(MethodConfig, "loss and its coefficients")
    training: TrainingConfig = section(TrainingConfig, "optimisation")
    cache_dir: Any = _field(None, optional(path_value), "frozen log-prob cache (default output_dir/logprob_cache)")
    recompute_stale_cache: bool = _field(False, boolean, "recompute stale cached log-probs instead of refusing")
    reuse_rounds_from: Any = _field(None, optional(path_value), "output_dir of another run: its finished rounds "
                                    "whose fingerprint equals this run's are hard-linked in, not retrained")

    @property
    def logprob_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "logprob_cache"

    def to_dict(self) -> dict:
        return config_to_dict(self)


# ----------------------------------------------------------------------------- loading

def _build(cls, data: Any, path: str):
    """Instantiate dataclass ``cls`` from ``data`` checking every field; ``path`` prefixes errors."""
    if not isinstance(data, dict):
        raise _fail(path or "config", "a mapping of fields", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown field (known: {', '.join(fields)})".lstrip("."))
    values = {}
    for name, spec in fields.items():
        where = f"{path}.{name}".lstrip(".")
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field is missing")
            continue
        check = spec.metadata.get("check")
        values[name] = check(where, data[name]) if check else data[name]
    return cls(**values)


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


def load_config(source, task: str | None = None):
    """A YAML file path, a dict of the same shape, or a config object (returned as is).

    The top-level ``task:`` (default ``preference``) selects the task's config dataclass and its
    cross-field checks from :mod:`pyalign.train.tasks`; ``task`` overrides it."""
    from pyalign.train import tasks  # noqa: PLC0415

    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        if task is not None and tasks.task_of(source).name != task:
            raise ConfigError(f"task: expected a {task} config, got a {tasks.task_of(source).name} one")
        return source
    data = read_config_source(source)
    name = data.pop("task", None)
    if task is not None:
        if name is not None and name != task:
            raise ConfigError(f"task: this runs {task!r}, the config says {name!r}")
        name = task
    spec = tasks.get_task(tasks.DEFAULT_TASK if name is None else name)
    config = _build(spec.config_class, data, "")
    if spec.check is not None:
        spec.check(config)
    return config


def config_to_dict(config) -> dict:
    """The resolved config as plain data, ``task`` first (loadable again by :func:`load_config`)."""
    from pyalign.train import tasks  # noqa: PLC0415

    return {"task": tasks.task_of(config).name, **dataclasses.asdict(config)}


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
        from pyalign.losses import SMOOTHING_RANGES  # noqa: PLC0415

        upper, inclusive = SMOOTHING_RANGES[method.loss]
        if method.label_smoothing > upper or (not inclusive and method.label_smoothing == upper):
            interval = f"[0, {upper}]" if inclusive else f"[0, {upper})"
            raise ConfigError(f"method.label_smoothing: {method.loss} needs a value in {interval}, "
                              f"got {method.label_smoothing}")
    if method.adaptive_alpha is not None:
        from pyalign.train.adaptive_alpha import check_adaptive_alpha  # noqa: PLC0415

        check_adaptive_alpha(config)
    check_model_folder(config.model)
    # rounds[].train/eval were checked by data_source when parsed (a local path must exist)


# ----------------------------------------------------------------------------- reference

def describe_config_class(cls, prefix: str = "") -> list[str]:
    """One line per field of ``cls`` and its sections: name, default, meaning."""
    lines = []
    nested = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if "section" in f.metadata:
            nested.append((f.metadata["section"], f"{name}."))
            continue
        if "items" in f.metadata:
            nested.append((f.metadata["items"], f"{name}[]."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        lines.append(f"{name:34s} {default!s:22s} {f.metadata.get('doc', '')}")
    for section_cls, section_prefix in nested:
        lines += describe_config_class(section_cls, section_prefix)
    return lines


def describe_fields(task: str | None = None) -> str:
    """The config reference as text, for ``pyalign config``: every registered task's fields
    (or one task's)."""
    from pyalign.train import tasks  # noqa: PLC0415

    names = [task] if task else tasks.task_names()
    blocks = []
    for name in names:
        spec = tasks.get_task(name)
        default = " (the default)" if name == tasks.DEFAULT_TASK else ""
        header = f"task: {name}{default} -- {spec.doc}"
        blocks.append("\n".join([header, "-" * min(len(header), 100), *describe_config_class(spec.config_class)]))
    return "\n\n".join(blocks)
