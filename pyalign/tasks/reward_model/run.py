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

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pyalign import distributed
from pyalign.data import file_fingerprint, tokenization_fingerprint
from pyalign.io import read_json, write_json_atomic
from pyalign.models import enable_activation_checkpointing, load_tokenizer, model_fingerprint
from pyalign.reward_model.data import RatingsDataset, check_within_scales, load_rated_examples, resolve_scales
from pyalign.reward_model.metrics import unflatten
from pyalign.reward_model.model import RewardModel, apply_backbone_lora, load_backbone
from pyalign.reward_model.model import reward_model_fingerprint as folder_fingerprint
from pyalign.tasks.reward_model.config import RewardModelConfig
from pyalign.tasks.reward_model.objective import RewardRegressionObjective
from pyalign.train import (
    ConfigError, Trainer, check_sharding, full_state_dict, is_sharded, load_config,
    lora_fingerprint, shard_model, stage_finished, start_run, training_fingerprint,
)

logger = logging.getLogger("pyalign.train")
STATE_FILE = "state.json"
MODEL_DIR = "reward_model"


# ----------------------------------------------------------------------------- the objective


# ----------------------------------------------------------------------------- the config


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
        "lora": lora_fingerprint(config.lora),
        "training": training_fingerprint(config.training),
        "model_dtype": config.model.dtype,
    }


# ----------------------------------------------------------------------------- the run

def run_reward_model(config, *, callback: Callable[[str, dict], None] | None = None) -> RewardModelResult:
    """Train the reward model of ``config`` (a path, dict or :class:`RewardModelConfig`),
    resuming whatever an earlier run left. ``callback(event, info)``: the trainer's steps."""
    config = load_config(config, task="reward_model")
    with start_run(config) as (device, output_dir):
        return _run(config, device, output_dir, callback)


def _run(config: RewardModelConfig, device, output_dir: Path, callback) -> RewardModelResult:
    training = config.training
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
    if stage_finished(output_dir, fingerprint, state_file=STATE_FILE, what="the reward model run",
                      model_dir=MODEL_DIR, fingerprint_of=folder_fingerprint):
        if distributed.is_main():
            logger.info("reward_model: already finished (%s), nothing to do", output_dir / STATE_FILE)
        result.metrics = read_json(output_dir / "metrics.json",
                                   remedy=f"delete {output_dir / STATE_FILE} to train the run again")
        return result

    def dataset(examples):
        if examples is None:
            return None
        return RatingsDataset(examples, scales, tokenizer, training.max_length, training.max_prompt_length)

    train, evaluation = dataset(train_examples), dataset(eval_examples)
    targets = torch.tensor([item.targets for item in train.items], dtype=torch.float64)
    spread = targets.std(0) if len(targets) > 1 else torch.ones(len(scales), dtype=torch.float64)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))

    check_sharding(training, device)

    def build(on_device) -> RewardModel:
        backbone = load_backbone(config.model.path, config.model.dtype).to(on_device)
        if training.gradient_checkpointing:
            enable_activation_checkpointing(backbone)
        if config.lora is not None:
            backbone = apply_backbone_lora(backbone, config.lora, seed=training.seed)
        return RewardModel(backbone, scales, tokenizer=tokenizer, offset=targets.mean(0).float(),
                           spread=spread.float(), max_length=training.max_length,
                           max_prompt_length=training.max_prompt_length)

    model = shard_model(build(device), training, device)
    trainer = Trainer(model, RewardRegressionObjective(names), train, training, output_dir, eval=evaluation,
                      fingerprint=fingerprint, callback=callback, name="reward_model")
    result.metrics = trainer.train()
    if is_sharded(model):  # gathered to process 0 and loaded into an unsharded copy there
        state = full_state_dict(model)
        model = build(torch.device("cpu")) if distributed.is_main() else None
        if model is not None:
            model.load_state_dict(state)
    if distributed.is_main():
        if config.lora is not None:
            model.backbone.save_pretrained(output_dir / "adapter")
        model.save(result.model_dir, extra={
            "base_model": config.model.path, "train_data": config.data.train,
            "validation": unflatten(result.metrics.get("eval", {})),
        })
        write_json_atomic(output_dir / STATE_FILE, {"status": "finished", "fingerprint": fingerprint,
                                                   "model_fingerprint": folder_fingerprint(result.model_dir),
                                                   "metrics": result.metrics.get("eval", {})}, checksum=True)
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    distributed.barrier()  # the reward model folder exists for every process from here on
    return result


def summary(result: RewardModelResult) -> list[str]:
    lines = []
    for name, values in result.heldout.items():
        lines.append(f"held-out {name}: mse={values['mse']:.4g} pearson={values['pearson']:.3f} "
                     f"pairwise_accuracy={values['pairwise_accuracy']:.3f} ({values['pairs']} pairs)")
    return lines + [f"reward model: {result.model_dir}"]
