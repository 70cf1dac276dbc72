"""One fine-tuning stage of a causal LM: a base model folder in, a model folder out.

A preference round, an SFT run and each fine-tune of the DPA loop are such a stage::

    base folder -> fresh seeded LoRA (or every parameter: lora null) [-> FSDP2 sharding]
                -> Trainer(objective, data) -> adapter/ + model/ (merged), or model/ (full)
                -> <stage_dir>/<state_file> {"status": "finished", "fingerprint": ...}

The state file is written last, so a stage is finished exactly when it exists; its fingerprint
(whatever the caller says the result depends on) is checked by :func:`stage_finished`, and a
finished stage made under other settings is refused rather than reused. The state file carries
its own checksum and the fingerprint of the model folder it finished with, both checked before a
finished stage is trusted: a damaged state file or model is refused naming the file. Until then the stage
resumes from ``<stage_dir>/checkpoints`` (removed once it is finished). In a multi-process run
every process trains, process 0 alone writes, and all wait for it before returning. Under
``training.sharding: fsdp`` (:mod:`pyalign.train.sharding`) the trained weights are gathered to
process 0 at the end and saved as one ordinary HF folder, as in an unsharded run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from pyalign import distributed
from pyalign.failures import DamagedFileError
from pyalign.io import atomic_directory, read_json, write_json_atomic
from pyalign.models import apply_lora, enable_activation_checkpointing, load_model, model_fingerprint, save_merged_model
from pyalign.train.objectives import Objective
from pyalign.train.sharding import check_sharding, full_state_dict, is_sharded, shard_model
from pyalign.train.trainer import Trainer

STATE_FILE = "round_state.json"


def stage_finished(stage_dir: str | Path, fingerprint: dict, *, state_file: str = STATE_FILE,
                   what: str = "stage", model_dir: str = "model",
                   fingerprint_of: Callable[[Path], str] = model_fingerprint) -> bool:
    """Whether the stage in ``stage_dir`` is finished; raises RuntimeError when it was finished
    under another fingerprint, :class:`~pyalign.failures.DamagedFileError` when its state file or
    its model folder ``model_dir`` (checked against the fingerprint recorded when it finished)
    changed since (``fingerprint_of`` computes a folder's fingerprint)."""
    stage_dir = Path(stage_dir)
    file = stage_dir / state_file
    if not file.is_file():
        return False
    redo = (f"delete {file} to train {what} again (or restore the folder from a copy; the stages after it "
            "depend on it too)")
    state = read_json(file, remedy=redo)
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise DamagedFileError(f"{file}: damaged: not a finished-stage record; {redo}")
    if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise RuntimeError(
            f"{file}: {what} was finished under different settings (base model, data, tokenisation, "
            "LoRA, method or training config); use a new output_dir or delete that folder "
            "(and those of the stages after it)"
        )
    recorded = state.get("model_fingerprint")
    if recorded is not None:
        now = _folder_fingerprint(stage_dir / model_dir, fingerprint_of)
        if now != recorded:
            problem = ("missing, or without weight files" if now is None else
                       "its weights or config differ from the fingerprint recorded")
            raise DamagedFileError(f"{stage_dir / model_dir}: damaged: {problem} in {file} when {what} finished; "
                                   f"{redo}")
    return True


def _folder_fingerprint(folder: Path, fingerprint_of: Callable[[Path], str]) -> str | None:
    try:
        return fingerprint_of(folder)
    except (OSError, ValueError):  # missing folder or no weight files left
        return None


def save_trained_model(model, *, lora, base_dir: str | Path, model_dtype: str, tokenizer,
                       stage_dir: str | Path, seed: int) -> None:
    """Write ``adapter/`` (LoRA runs) and ``model/`` (merged weights, or the whole trained model)
    as ordinary HF folders. Every process calls it: a sharded model is gathered to process 0
    first, which rebuilds an unsharded copy from the base folder and loads the gathered weights
    into it (process 0 then holds about two copies of the model in CPU memory)."""
    stage_dir = Path(stage_dir)
    if is_sharded(model):
        state = full_state_dict(model)
        if not distributed.is_main():
            return
        model = load_model(base_dir, model_dtype, torch.device("cpu"))
        if lora is not None:
            model = apply_lora(model, lora, seed=seed)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not name.endswith("lm_head.weight") for name in missing):  # tied lm_head
            raise RuntimeError(f"fsdp: the gathered weights do not fit the model rebuilt from {base_dir} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    elif not distributed.is_main():
        return
    if lora is not None:
        model.save_pretrained(stage_dir / "adapter")
        save_merged_model(model, tokenizer, stage_dir / "model")
        return
    with atomic_directory(stage_dir / "model") as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def train_lora_stage(
    *,
    base_dir: str | Path,
    stage_dir: str | Path,
    tokenizer,
    objective: Objective,
    train,
    eval=None,
    lora,
    training,
    model_dtype: str,
    device,
    fingerprint: dict,
    seed: int,
    name: str,
    round_number: int = 1,
    callback: Callable[[str, dict], None] | None = None,
    state_file: str = STATE_FILE,
    extra_state: dict | None = None,
) -> dict:
    """Train one stage (resuming its checkpoint if any) and write its outputs; returns the
    trainer's ``{"train", "eval", "history"}``. ``lora``: the LoRA section, or None to train every
    parameter; ``seed`` fixes the LoRA's initialisation."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    check_sharding(training, device)
    base = load_model(base_dir, model_dtype, device)
    if training.gradient_checkpointing:
        enable_activation_checkpointing(base)
    model = apply_lora(base, lora, seed=seed) if lora is not None else base.requires_grad_(True)
    model = shard_model(model, training, device)
    trainer = Trainer(model, objective, train, training, stage_dir, eval=eval, fingerprint=fingerprint,
                      callback=callback, name=name, round_number=round_number)
    metrics = trainer.train()
    save_trained_model(model, lora=lora, base_dir=base_dir, model_dtype=model_dtype, tokenizer=tokenizer,
                       stage_dir=stage_dir, seed=seed)
    if distributed.is_main():
        write_json_atomic(stage_dir / state_file, {
            "status": "finished", "fingerprint": fingerprint,
            "model_fingerprint": model_fingerprint(stage_dir / "model"), "metrics": metrics["eval"],
            **(extra_state or {}),
        }, checksum=True)
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    distributed.barrier()  # the model folder exists for every process from here on
    return metrics


# The name says what most stages train; lora=None trains every parameter.
train_stage = train_lora_stage
