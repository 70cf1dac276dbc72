"""Sequential Preference Optimization: K preference dimensions, one round each (SPEC 3.3).

Round 1 trains pi_1 from pi_0 with DPO (or the configured loss); round n >= 2 trains pi_n from
pi_{n-1} with the SPO loss and the round's alphas (all zero: S-DPO). Each round trains a fresh
LoRA on top of pi_{n-1}, then merges it into the weights: ``<output_dir>/round_<n>_<name>/model``
is pi_n, an ordinary HF folder, and the base of round n+1.

Frozen log-probs: as soon as pi_i exists (pi_0 at the start, pi_n after round n) it is run once on
the train and eval data of every later round that needs it and the results are cached on disk
(:mod:`pyalign.train.logprob_cache`). Round n then needs only pi_{n-1} (as its base) in memory.

Resuming: a round is finished when ``round_state.json`` says so; finished rounds and cached
log-probs are never redone (after checking they were made under the same model, data, tokenisation
and settings); an unfinished round continues from its last checkpoint. Every model is loaded from
its saved folder, in both fresh and resumed runs, so a resumed run computes what an uninterrupted
one does.

Layout of ``output_dir``::

    config.json                    the resolved config of the last start
    logprob_cache/model_<i>/round_<r>_<split>.pt
    round_<n>_<name>/checkpoints/  adapter + optimizer checkpoints (removed once the round is done)
    round_<n>_<name>/tensorboard/
    round_<n>_<name>/adapter/      the round's LoRA (peft format, on top of pi_{n-1})
    round_<n>_<name>/model/        pi_n: merged weights + tokenizer
    round_<n>_<name>/metrics.json  training history and final eval
    round_<n>_<name>/round_state.json
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pyalign.data import PreferenceDataset, file_fingerprint, tokenization_fingerprint
from pyalign.io import write_json_atomic
from pyalign.train.config import SequentialConfig, load_config
from pyalign.train.logprob_cache import CacheKey, FrozenLogprobs, LogprobCache, dataset_logprobs
from pyalign.train.modeling import (
    apply_lora, enable_activation_checkpointing, load_model, load_tokenizer, model_fingerprint, resolve_device, save_merged_model,
    uses_autocast,
)
from pyalign.train.trainer import Objective, PreferenceTrainer, RoundData

logger = logging.getLogger("pyalign.train")
SPLITS = ("train", "eval")


@dataclass
class SequentialResult:
    round_dirs: list[Path]
    final_model_dir: Path
    metrics: list[dict] = field(default_factory=list)  # per round: {"train", "eval", "history"}


def round_dir(config: SequentialConfig, round_number: int) -> Path:
    return Path(config.output_dir) / f"round_{round_number}_{config.rounds[round_number - 1].name}"


def round_alphas(config: SequentialConfig, round_number: int) -> list[float]:
    """The alphas round n uses; S-DPO rounds (spo with every alpha 0) use none, since their
    reward beta*log(pi_n/pi_{n-1}) involves only the reference."""
    if config.method.loss != "spo":
        return []
    alphas = config.method.alphas_for_round(round_number)
    return alphas if any(a != 0 for a in alphas) else []


def chain_models(config: SequentialConfig, round_number: int) -> list[int]:
    """Indices i of the frozen models pi_i whose log-probs round n needs (the last is pi_{n-1})."""
    n_models = len(round_alphas(config, round_number)) + 1
    return list(range(round_number - n_models, round_number))


class SequentialRun:
    """State shared by the rounds of one run; see :func:`run_sequential`."""

    def __init__(self, config: SequentialConfig, callback: Callable[[str, dict], None] | None):
        self.config = config
        self.callback = callback or (lambda event, info: None)
        self.training = config.training
        self.device = resolve_device(self.training.device)
        self.output_dir = Path(config.output_dir)
        self.cache = LogprobCache(config.logprob_cache_dir, recompute_stale=config.recompute_stale_cache)
        self.tokenizer = load_tokenizer(config.model.path)
        self.tokenization = tokenization_fingerprint(
            self.tokenizer, self.training.max_length, self.training.max_prompt_length
        )
        self.average = config.method.loss == "ipo"  # ipo works on length-averaged log-probs
        autocast = uses_autocast(self.device, self.training.mixed_precision)
        self.precision = config.model.dtype + ("+bf16-autocast" if autocast else "")
        self.model_dirs = [Path(config.model.path)] + [round_dir(config, n) / "model" for n in self.round_numbers]
        self._datasets: dict[tuple[int, str], PreferenceDataset] = {}
        self._fingerprints: dict[Path, str] = {}

    @property
    def round_numbers(self) -> range:
        return range(1, len(self.config.rounds) + 1)

    def data_file(self, round_number: int, split: str) -> str | None:
        return getattr(self.config.rounds[round_number - 1], split)

    def dataset(self, round_number: int, split: str) -> PreferenceDataset | None:
        file = self.data_file(round_number, split)
        if file is None:
            return None
        if (round_number, split) not in self._datasets:
            self._datasets[(round_number, split)] = PreferenceDataset.from_jsonl(
                file, self.tokenizer, self.training.max_length, self.training.max_prompt_length
            )
        return self._datasets[(round_number, split)]

    def model_fingerprint(self, index: int) -> str:
        path = self.model_dirs[index]
        if path not in self._fingerprints:
            self._fingerprints[path] = model_fingerprint(path)
        return self._fingerprints[path]

    def cache_key(self, model_index: int, round_number: int, split: str) -> CacheKey:
        return CacheKey(
            model_index=model_index,
            model_fingerprint=self.model_fingerprint(model_index),
            round_index=round_number,
            split=split,
            data_fingerprint=file_fingerprint(self.data_file(round_number, split)),
            tokenization=self.tokenization,
            average=self.average,
            precision=self.precision,
        )

    # ------------------------------------------------------------------ frozen log-probs
    def cache_frozen_logprobs(self, model_index: int) -> None:
        """Run pi_i once over the data of every later round that needs it; skip cached entries."""
        missing = [
            (n, split)
            for n in self.round_numbers
            if model_index in chain_models(self.config, n)
            for split in SPLITS
            if self.data_file(n, split) is not None
            and self.cache.load(self.cache_key(model_index, n, split)) is None
        ]
        if not missing:
            return
        logger.info("caching log-probs of pi_%d on %d data set(s)", model_index, len(missing))
        model = load_model(self.model_dirs[model_index], self.config.model.dtype, self.device)
        batch_size = self.training.eval_batch_size or self.training.batch_size
        for n, split in missing:
            chosen, rejected = dataset_logprobs(
                model, self.dataset(n, split), batch_size=batch_size, device=self.device,
                mixed_precision=self.training.mixed_precision, average=self.average,
                fused=self.training.fused_lm_head,
                progress=f"log-probs of pi_{model_index} on round {n} {split}" if self.training.progress_bar else None,
            )
            path = self.cache.save(self.cache_key(model_index, n, split), chosen, rejected)
            self.callback("cache_saved", {"model": model_index, "round": n, "split": split, "path": path})
        del model

    def frozen_chain(self, round_number: int, split: str) -> FrozenLogprobs | None:
        if self.data_file(round_number, split) is None:
            return None
        chosen, rejected = [], []
        for i in chain_models(self.config, round_number):
            entry = self.cache.load(self.cache_key(i, round_number, split))
            if entry is None:
                raise RuntimeError(f"log-probs of pi_{i} on round {round_number} {split} data are not cached")
            chosen.append(entry[0])
            rejected.append(entry[1])
        return FrozenLogprobs(torch.stack(chosen), torch.stack(rejected))

    # ------------------------------------------------------------------ rounds
    def round_fingerprint(self, round_number: int) -> dict:
        """What a round's result depends on; a checkpoint or finished round with another one is
        refused rather than silently mixed with the new settings."""
        config = self.config
        training = {k: v for k, v in asdict(config.training).items()
                    if k not in ("eval_every", "save_every", "log_every", "keep_checkpoints",
                                 "progress_bar", "tensorboard", "device", "eval_batch_size",
                                 "num_threads")}
        return {
            "round": round_number,
            "base_model": self.model_fingerprint(round_number - 1),
            "train_data": file_fingerprint(self.data_file(round_number, "train")),
            "tokenization": self.tokenization,
            "lora": asdict(config.lora),
            # this round's alphas only: changing a later round's alpha leaves this round valid
            "method": {k: v for k, v in asdict(config.method).items() if k != "alpha"},
            "alphas": round_alphas(config, round_number),
            "training": training,
            "model_dtype": config.model.dtype,
        }

    def finished(self, round_number: int) -> bool:
        state_file = round_dir(self.config, round_number) / "round_state.json"
        if not state_file.is_file():
            return False
        state = json.loads(state_file.read_text(encoding="utf-8"))
        expected = json.loads(json.dumps(self.round_fingerprint(round_number)))
        if state["fingerprint"] != expected:
            raise RuntimeError(
                f"{state_file}: round {round_number} was finished under different settings "
                "(base model, data, tokenisation, LoRA, method or training config); "
                "use a new output_dir or delete that round's folder and the ones after it"
            )
        return True

    def train_round(self, round_number: int) -> dict:
        config, directory = self.config, round_dir(self.config, round_number)
        directory.mkdir(parents=True, exist_ok=True)
        alphas = round_alphas(config, round_number)
        logger.info("round %d (%s): loss %s, alphas %s, chain pi_%s", round_number,
                    config.rounds[round_number - 1].name, config.method.loss, alphas,
                    chain_models(config, round_number))
        base = load_model(self.model_dirs[round_number - 1], config.model.dtype, self.device)
        if self.training.gradient_checkpointing:
            enable_activation_checkpointing(base)
        model = apply_lora(base, config.lora, seed=self.training.seed + round_number)
        data = RoundData(
            train=self.dataset(round_number, "train"),
            train_chain=self.frozen_chain(round_number, "train"),
            eval=self.dataset(round_number, "eval"),
            eval_chain=self.frozen_chain(round_number, "eval"),
        )
        torch.manual_seed(self.training.seed + round_number)  # dropout stream (restored on resume)
        trainer = PreferenceTrainer(
            model, data, Objective(config.method, alphas), self.training, directory,
            fingerprint=self.round_fingerprint(round_number), callback=self.callback, round_number=round_number,
            name=f"round {round_number}/{len(config.rounds)} {config.rounds[round_number - 1].name}",
        )
        metrics = trainer.train()
        model.save_pretrained(directory / "adapter")
        save_merged_model(model, self.tokenizer, directory / "model")
        write_json_atomic(directory / "round_state.json",
                          {"status": "finished", "fingerprint": self.round_fingerprint(round_number),
                           "model_fingerprint": self.model_fingerprint(round_number), "metrics": metrics["eval"]})
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
        self.callback("round_done", {"round": round_number, "dir": directory})
        return metrics


def run_sequential(
    config,
    *,
    callback: Callable[[str, dict], None] | None = None,
    recompute_stale_cache: bool | None = None,
) -> SequentialResult:
    """Train every round of ``config`` (a path, dict or :class:`SequentialConfig`), resuming
    whatever an earlier run left. ``callback(event, info)`` is called on ``"step"``,
    ``"cache_saved"`` and ``"round_done"`` (tests use it to simulate a crash)."""
    config = load_config(config)
    if recompute_stale_cache is not None:
        config.recompute_stale_cache = recompute_stale_cache
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "config.json", config.to_dict())
    run = SequentialRun(config, callback)
    metrics = []
    for n in run.round_numbers:
        run.cache_frozen_logprobs(n - 1)  # pi_{n-1} is final now: cache it for rounds n..K
        if run.finished(n):
            logger.info("round %d (%s): already finished, skipped", n, config.rounds[n - 1].name)
            shutil.rmtree(round_dir(config, n) / "checkpoints", ignore_errors=True)  # if killed before cleanup
            metrics.append(json.loads((round_dir(config, n) / "metrics.json").read_text(encoding="utf-8")))
            continue
        metrics.append(run.train_round(n))
    round_dirs = [round_dir(config, n) for n in run.round_numbers]
    return SequentialResult(round_dirs=round_dirs, final_model_dir=round_dirs[-1] / "model", metrics=metrics)
