"""One LoRA fine-tuning stage of a causal LM: a base model folder in, a merged model folder out.

A preference round, an SFT run and each fine-tune of the DPA loop are such a stage::

    base folder -> fresh seeded LoRA -> Trainer(objective, data) -> adapter/ + model/ (merged)
                -> <stage_dir>/<state_file> {"status": "finished", "fingerprint": ...}

The state file is written last, so a stage is finished exactly when it exists; its fingerprint
(whatever the caller says the result depends on) is checked by :func:`stage_finished`, and a
finished stage made under other settings is refused rather than reused. Until then the stage
resumes from ``<stage_dir>/checkpoints`` (removed once it is finished). In a multi-process run
every process trains, process 0 alone writes, and all wait for it before returning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from pyalign import distributed
from pyalign.io import write_json_atomic
from pyalign.models import apply_lora, enable_activation_checkpointing, load_model, model_fingerprint, save_merged_model
from pyalign.train.objectives import Objective
from pyalign.train.trainer import Trainer

STATE_FILE = "round_state.json"


def stage_finished(stage_dir: str | Path, fingerprint: dict, *, state_file: str = STATE_FILE,
                   what: str = "stage") -> bool:
    """Whether the stage in ``stage_dir`` is finished; raises RuntimeError when it was finished
    under another fingerprint."""
    file = Path(stage_dir) / state_file
    if not file.is_file():
        return False
    state = json.loads(file.read_text(encoding="utf-8"))
    if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise RuntimeError(
            f"{file}: {what} was finished under different settings (base model, data, tokenisation, "
            "LoRA, method or training config); use a new output_dir or delete that folder "
            "(and those of the stages after it)"
        )
    return True


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
    trainer's ``{"train", "eval", "history"}``. ``seed`` fixes the LoRA's initialisation."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    base = load_model(base_dir, model_dtype, device)
    if training.gradient_checkpointing:
        enable_activation_checkpointing(base)
    model = apply_lora(base, lora, seed=seed)
    trainer = Trainer(model, objective, train, training, stage_dir, eval=eval, fingerprint=fingerprint,
                      callback=callback, name=name, round_number=round_number)
    metrics = trainer.train()
    if distributed.is_main():
        model.save_pretrained(stage_dir / "adapter")
        save_merged_model(model, tokenizer, stage_dir / "model")
        write_json_atomic(stage_dir / state_file, {
            "status": "finished", "fingerprint": fingerprint,
            "model_fingerprint": model_fingerprint(stage_dir / "model"), "metrics": metrics["eval"],
            **(extra_state or {}),
        })
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    distributed.barrier()  # the merged model exists for every process from here on
    return metrics
