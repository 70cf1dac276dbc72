"""Supervised fine-tuning (``task: sft``): a LoRA on (prompt, response) examples, NLL of the
response tokens through pyalign's fused lm_head, merged into a new model folder.

    pyalign train configs/sft_example.yaml

Layout of ``output_dir``::

    config.json          the resolved config of the last start
    checkpoints/         mid-run checkpoints (removed when the run finishes)
    tensorboard/
    adapter/             the LoRA (peft format) on top of model.path
    model/               merged weights + tokenizer: an ordinary HF folder
    metrics.json         training history and final eval (loss = NLL per response token, perplexity)
    state.json           finished, with the fingerprint of what the result depends on

A killed run resumes from its last checkpoint when the same command is run again; a finished one
is not redone (and is refused if the model, data, tokenisation or settings changed since).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pyalign import distributed
from pyalign.data import file_fingerprint, tokenization_fingerprint
from pyalign.io import read_json
from pyalign.models import load_tokenizer, model_fingerprint
from pyalign.tasks.sft.config import SFTConfig
from pyalign.tasks.sft.data import SFTDataset
from pyalign.train import (
    SFTObjective, load_config, lora_fingerprint, stage_finished, start_run, train_lora_stage,
    training_fingerprint,
)

logger = logging.getLogger("pyalign.train")
STATE_FILE = "state.json"


@dataclass
class SFTResult:
    output_dir: Path
    model_dir: Path
    metrics: dict = field(default_factory=dict)  # {"train", "eval", "history"}


def sft_fingerprint(config: SFTConfig, tokenization: dict) -> dict:
    """What the result depends on: a finished run or checkpoint with another one is refused."""
    return {
        "task": "sft",
        "base_model": model_fingerprint(config.model.path),
        "train_data": file_fingerprint(config.data.train),
        "tokenization": tokenization,
        "lora": lora_fingerprint(config.lora),
        "training": training_fingerprint(config.training),
        "model_dtype": config.model.dtype,
    }


def run_sft(config, *, callback: Callable[[str, dict], None] | None = None) -> SFTResult:
    """Fine-tune ``config`` (a path, dict or :class:`SFTConfig`), resuming whatever an earlier
    run left. ``callback(event, info)``: the trainer's ``"step"`` events."""
    config = load_config(config, task="sft")
    with start_run(config) as (device, output_dir):
        return _run(config, device, output_dir, callback)


def _run(config: SFTConfig, device, output_dir: Path, callback) -> SFTResult:
    training = config.training
    tokenizer = load_tokenizer(config.model.path)
    tokenization = tokenization_fingerprint(tokenizer, training.max_length, training.max_prompt_length)
    fingerprint = sft_fingerprint(config, tokenization)
    result = SFTResult(output_dir, output_dir / "model")
    if stage_finished(output_dir, fingerprint, state_file=STATE_FILE, what="the SFT run"):
        if distributed.is_main():
            logger.info("sft: already finished (%s), nothing to do", output_dir / STATE_FILE)
        result.metrics = read_json(output_dir / "metrics.json",
                                   remedy=f"delete {output_dir / STATE_FILE} to train the run again")
        return result

    def dataset(file):
        return None if file is None else SFTDataset.from_jsonl(file, tokenizer, training.max_length,
                                                              training.max_prompt_length)

    result.metrics = train_lora_stage(
        base_dir=config.model.path, stage_dir=output_dir, tokenizer=tokenizer,
        objective=SFTObjective(fused=training.fused_lm_head),
        train=dataset(config.data.train), eval=dataset(config.data.eval),
        lora=config.lora, training=training, model_dtype=config.model.dtype, device=device,
        fingerprint=fingerprint, seed=training.seed, name="sft", callback=callback, state_file=STATE_FILE,
    )
    return result


def summary(result: SFTResult) -> list[str]:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.get("eval", {}).items())
    return ([f"eval: {shown}"] if shown else []) + [f"model: {result.model_dir}"]
