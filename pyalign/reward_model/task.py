"""Training the reward model: the regression objective and ``task: reward_model`` of ``pyalign train``.

    pyalign train configs/reward_model_example.yaml

The trainer (:class:`pyalign.train.trainer.Trainer`: data order, micro-batches, processes,
checkpoints, resume, logging) is the same as for preference pairs and SFT; only the objective
differs. Layout of ``output_dir``::

    config.json          the resolved config of the last start
    checkpoints/         mid-run checkpoints (removed when the run finishes)
    tensorboard/
    adapter/             the backbone's LoRA alone (peft format), for reference
    reward_model/        the reward model folder (pyalign.reward_model.RewardModel.load)
    metrics.json         training history and the final validation metrics (flat keys)
    state.json           finished, with the fingerprint of what the result depends on

A killed run resumes from its last checkpoint; a finished one is not redone, and is refused if
the model, data, objectives, tokenisation or settings changed since.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from pyalign import distributed
from pyalign.data import file_fingerprint, tokenization_fingerprint
from pyalign.io import write_json_atomic
from pyalign.reward_model.data import (
    RatingsDataset, check_within_scales, load_rated_examples, resolve_scales,
)
from pyalign.reward_model.metrics import flatten, objective_metrics, unflatten
from pyalign.reward_model.model import RewardModel, apply_backbone_lora, load_backbone
from pyalign.train.config import (
    ConfigError, LoraConfig, ModelConfig, TrainingConfig, _fail, _field, _number, check_file,
    check_lengths, check_model_folder, config_to_dict, load_config, optional, path_value, section,
    training_fingerprint,
)
from pyalign.train.modeling import enable_activation_checkpointing, load_tokenizer, model_fingerprint, resolve_device
from pyalign.train.objectives import Objective, ObjectiveOutput
from pyalign.train.stage import stage_finished
from pyalign.train.tasks import Task, register_task
from pyalign.train.trainer import Trainer

logger = logging.getLogger("pyalign.train")
STATE_FILE = "state.json"
MODEL_DIR = "reward_model"


# ----------------------------------------------------------------------------- the objective

class RewardRegressionObjective(Objective):
    """MSE between the reward model's ratings and the true ratings, both on the 0-100 scale,
    averaged over the batch's examples and the k objectives (the DPA paper's eq. 1 divided by k).
    Batches come from :class:`pyalign.reward_model.data.RatingsDataset`; validation reports,
    per objective, MSE, Pearson r and pairwise ranking accuracy
    (:mod:`pyalign.reward_model.metrics`)."""

    name = "reward_model"
    unit = "examples"
    progress_metrics = ()

    def __init__(self, objectives):
        self.objectives = list(objectives)

    def check_data(self, dataset, split: str) -> None:
        names = [s.name for s in getattr(dataset, "scales", [])]
        if names != self.objectives:
            raise ValueError(f"data.{split}: expected ratings of the objectives {self.objectives}, "
                             f"the data set has {names}")

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["targets"].shape[0])

    def loss(self, model, batch: dict[str, Tensor]) -> ObjectiveOutput:
        # batch -> backbone -> final hidden state at the last non-padding token -> head -> [B, k]
        predictions = model(batch["input_ids"], batch["attention_mask"])
        # -> squared error on the 0-100 scale, mean over examples and objectives
        errors = (predictions - batch["targets"].to(predictions)) ** 2
        loss = errors.mean()
        metrics = {"loss": loss.item()}
        metrics.update({f"mse/{name}": errors[:, k].mean().item() for k, name in enumerate(self.objectives)})
        return ObjectiveOutput(loss, metrics)

    @torch.no_grad()
    def eval_rows(self, model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"predictions": model(batch["input_ids"], batch["attention_mask"]).float(),
                "targets": batch["targets"].float(), "group": batch["group"]}

    def eval_metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        return flatten(objective_metrics(rows["predictions"], rows["targets"], rows["group"], self.objectives))


# ----------------------------------------------------------------------------- the config

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


@dataclass
class RewardModelResult:
    output_dir: Path
    model_dir: Path  # the reward model folder
    metrics: dict = field(default_factory=dict)  # {"train", "eval", "history"}; eval has flat keys

    @property
    def heldout(self) -> dict[str, dict]:
        """``{objective: {"mse", "pearson", "pairwise_accuracy", "pairs"}}`` of the final validation."""
        return unflatten(self.metrics.get("eval", {}))


def reward_model_fingerprint(config: RewardModelConfig, scales, tokenization: dict) -> dict:
    return {
        "task": "reward_model",
        "base_model": model_fingerprint(config.model.path),
        "train_data": file_fingerprint(config.data.train),
        "objectives": [asdict(s) for s in scales],
        "tokenization": tokenization,
        "lora": asdict(config.lora),
        "training": training_fingerprint(config.training),
        "model_dtype": config.model.dtype,
    }


# ----------------------------------------------------------------------------- the run

def run_reward_model(config, *, callback: Callable[[str, dict], None] | None = None) -> RewardModelResult:
    """Train the reward model of ``config`` (a path, dict or :class:`RewardModelConfig`),
    resuming whatever an earlier run left. ``callback(event, info)``: the trainer's steps."""
    config = load_config(config, task="reward_model")
    training = config.training
    device = distributed.process_device(resolve_device(training.device))
    distributed.init_from_env(device)
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_json_atomic(output_dir / "config.json", config_to_dict(config))

    names = list(config.objectives)
    tokenizer = load_tokenizer(config.model.path)
    train_examples = load_rated_examples(config.data.train, names)
    eval_examples = load_rated_examples(config.data.eval, names) if config.data.eval else None
    try:
        scales = resolve_scales(config.objectives, train_examples)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    given = [s for s in scales if config.objectives[s.name] is not None]
    check_within_scales(train_examples, given, config.data.train)
    if eval_examples is not None:
        check_within_scales(eval_examples, given, config.data.eval)

    tokenization = tokenization_fingerprint(tokenizer, training.max_length, training.max_prompt_length)
    fingerprint = reward_model_fingerprint(config, scales, tokenization)
    result = RewardModelResult(output_dir, output_dir / MODEL_DIR)
    if stage_finished(output_dir, fingerprint, state_file=STATE_FILE, what="the reward model run"):
        if distributed.is_main():
            logger.info("reward_model: already finished (%s), nothing to do", output_dir / STATE_FILE)
        result.metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
        return result

    def dataset(examples):
        if examples is None:
            return None
        return RatingsDataset(examples, scales, tokenizer, training.max_length, training.max_prompt_length)

    train, evaluation = dataset(train_examples), dataset(eval_examples)
    targets = torch.tensor([item.targets for item in train.items], dtype=torch.float64)
    spread = targets.std(0) if len(targets) > 1 else torch.ones(len(scales), dtype=torch.float64)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))

    backbone = load_backbone(config.model.path, config.model.dtype).to(device)
    if training.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    backbone = apply_backbone_lora(backbone, config.lora, seed=training.seed)
    model = RewardModel(backbone, scales, tokenizer=tokenizer, offset=targets.mean(0).float(), spread=spread.float(),
                        max_length=training.max_length, max_prompt_length=training.max_prompt_length)
    trainer = Trainer(model, RewardRegressionObjective(names), train, training, output_dir, eval=evaluation,
                      fingerprint=fingerprint, callback=callback, name="reward_model")
    result.metrics = trainer.train()
    if distributed.is_main():
        model.backbone.save_pretrained(output_dir / "adapter")
        model.save(result.model_dir, extra={
            "base_model": config.model.path, "train_data": config.data.train,
            "validation": unflatten(result.metrics.get("eval", {})),
        })
        write_json_atomic(output_dir / STATE_FILE, {"status": "finished", "fingerprint": fingerprint,
                                                   "metrics": result.metrics.get("eval", {})})
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    distributed.barrier()  # the reward model folder exists for every process from here on
    return result


def _summary(result: RewardModelResult) -> list[str]:
    lines = []
    for name, values in result.heldout.items():
        lines.append(f"held-out {name}: mse={values['mse']:.4g} pearson={values['pearson']:.3f} "
                     f"pairwise_accuracy={values['pairwise_accuracy']:.3f} ({values['pairs']} pairs)")
    return lines + [f"reward model: {result.model_dir}"]


register_task(Task("reward_model", RewardModelConfig, run_reward_model, check=check_reward_model,
                   summary=_summary,
                   doc="multi-objective reward model: LoRA backbone + k-output head, MSE on ratings rescaled to 0-100"))
