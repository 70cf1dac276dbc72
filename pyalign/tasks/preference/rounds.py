"""Sequential Preference Optimization: K preference dimensions, one round each (SPEC 3.3).

Round 1 trains pi_1 from pi_0 with DPO (or the configured loss); round n >= 2 trains pi_n from
pi_{n-1} with the SPO loss and the round's alphas (all zero: S-DPO). Each round trains a fresh
LoRA on top of pi_{n-1}, then merges it into the weights: ``<output_dir>/round_<n>_<name>/model``
is pi_n, an ordinary HF folder, and the base of round n+1.

Frozen log-probs: as soon as pi_i exists (pi_0 at the start, pi_n after round n) it is run once on
the train and eval data of every later round that needs it and the results are cached on disk
(:mod:`pyalign.train.logprob_cache`). Round n then needs only pi_{n-1} (as its base) in memory.

Several processes (``torchrun`` / ``accelerate launch``; see docs/training.md): each frozen
model's pairs are split over the processes, their log-probs gathered in order and written once by
process 0 (the cache key does not depend on the number of processes, so any later run, with any
number of processes, reuses the entry); every process trains each round (:mod:`pyalign.train.trainer`);
process 0 writes checkpoints, the merged model and the round state.

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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pyalign import distributed
from pyalign.data import PreferenceDataset, data_fingerprint, tokenization_fingerprint
from pyalign.io import atomic_directory, read_json
from pyalign.models import load_model, load_tokenizer, model_fingerprint, resolve_device, uses_autocast
from pyalign.tasks.preference import adaptive_alpha
from pyalign.tasks.preference.config import SequentialConfig, chain_models, round_alphas, round_dir
from pyalign.train import (
    STATE_FILE, CacheKey, FrozenLogprobs, LogprobCache, PairsWithFrozenLogprobs, PreferenceObjective,
    dataset_logprobs, is_sharded, load_config, lora_fingerprint, shard_model, stage_finished, start_run,
    stop_if_requested, train_lora_stage, training_fingerprint,
)

logger = logging.getLogger("pyalign.train")
SPLITS = ("train", "eval")


@dataclass
class SequentialResult:
    round_dirs: list[Path]
    final_model_dir: Path
    metrics: list[dict] = field(default_factory=list)  # per round: {"train", "eval", "history"}


class SequentialRun:
    """State shared by the rounds of one run; see :func:`run_sequential`."""

    def __init__(self, config: SequentialConfig, callback: Callable[[str, dict], None] | None):
        self.config = config
        self.callback = callback or (lambda event, info: None)
        self.training = config.training
        self.device = distributed.process_device(resolve_device(self.training.device))
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
        for n in self.round_numbers:  # read every round's data now: a bad source fails before any training
            for split in SPLITS:
                if self.data_file(n, split) is not None:
                    data_fingerprint(self.data_file(n, split))

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
            data_fingerprint=data_fingerprint(self.data_file(round_number, split)),
            tokenization=self.tokenization,
            average=self.average,
            precision=self.precision,
        )

    # ------------------------------------------------------------------ frozen log-probs
    def cache_frozen_logprobs(self, model_index: int) -> None:
        """Run pi_i once over the data of every later round that needs it; skip cached entries.
        With several processes each runs its share of the pairs and process 0 writes the entry."""
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
        if distributed.is_main():
            logger.info("caching log-probs of pi_%d on %d data set(s)", model_index, len(missing))
        # Sharded like the trained model under sharding: fsdp (every process then runs as many
        # batches as the busiest one); whole on every process otherwise.
        model = shard_model(load_model(self.model_dirs[model_index], self.config.model.dtype, self.device),
                            self.training, self.device)
        batch_size = self.training.eval_batch_size or self.training.batch_size
        show = self.training.progress_bar and distributed.is_main()
        for n, split in missing:
            dataset = self.dataset(n, split)
            mine = distributed.shard_indices(len(dataset))
            busiest = -(-len(dataset) // distributed.world_size())
            chosen, rejected = dataset_logprobs(
                model, dataset, batch_size=batch_size, device=self.device, indices=mine,
                min_batches=-(-busiest // batch_size) if is_sharded(model) else 0,
                mixed_precision=self.training.mixed_precision, average=self.average,
                fused=self.training.fused_lm_head,
                progress=f"log-probs of pi_{model_index} on round {n} {split}" if show else None,
            )
            self.callback("logprobs_computed", {"model": model_index, "round": n, "split": split,
                                                "pairs": len(mine)})
            rows = distributed.gather_in_order(list(zip(chosen.tolist(), rejected.tolist())))
            if distributed.is_main():
                chosen, rejected = torch.tensor(rows, dtype=torch.float32).reshape(-1, 2).unbind(1)
                path = self.cache.save(self.cache_key(model_index, n, split), chosen, rejected)
                self.callback("cache_saved", {"model": model_index, "round": n, "split": split, "path": path})
            distributed.barrier()  # the entry exists for every process from here on
            stop_if_requested(f"after caching the log-probs of pi_{model_index} on round {n} {split}")
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
        fingerprint = {
            "round": round_number,
            "base_model": self.model_fingerprint(round_number - 1),
            "train_data": data_fingerprint(self.data_file(round_number, "train")),
            "tokenization": self.tokenization,
            "lora": lora_fingerprint(config.lora),
            # this round's alphas only: changing a later round's alpha leaves this round valid
            "method": {k: v for k, v in config.method.model_dump().items() if k not in ("alpha", "adaptive_alpha")},
            "alphas": round_alphas(config, round_number),
            "training": training_fingerprint(config.training),
            "model_dtype": config.model.dtype,
        }
        if config.method.adaptive_alpha is not None and round_alphas(config, round_number):
            fingerprint["adaptive_alpha"] = config.method.adaptive_alpha.model_dump()  # rounds that adapt only
        return fingerprint

    def finished(self, round_number: int) -> bool:
        return stage_finished(round_dir(self.config, round_number), self.round_fingerprint(round_number),
                              what=f"round {round_number}")

    def reuse_finished_round(self, round_number: int) -> bool:
        """Hard-link round n from ``config.reuse_rounds_from`` (another run's output_dir) when it is
        finished there under this run's fingerprint (e.g. round 1 shared by runs that differ only
        in later rounds' alphas). Returns whether it did."""
        if self.config.reuse_rounds_from is None:
            return False
        target = round_dir(self.config, round_number)
        source = Path(self.config.reuse_rounds_from) / target.name
        state_file = source / STATE_FILE
        if not state_file.is_file():
            return False
        state = read_json(state_file)
        if state.get("fingerprint") != json.loads(json.dumps(self.round_fingerprint(round_number))):
            return False
        stage_finished(source, self.round_fingerprint(round_number), what=f"round {round_number} of {source.parent}")
        if distributed.is_main():
            with atomic_directory(target) as partial:  # finished files are never rewritten in place
                shutil.copytree(source, partial, copy_function=_link_or_copy, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("checkpoints"))
            logger.info("round %d (%s): reused from %s", round_number, self.config.rounds[round_number - 1].name, source)
        distributed.barrier()
        return True

    def round_data(self, round_number: int, split: str) -> PairsWithFrozenLogprobs | None:
        pairs = self.dataset(round_number, split)
        return None if pairs is None else PairsWithFrozenLogprobs(pairs, self.frozen_chain(round_number, split))

    def train_round(self, round_number: int) -> dict:
        config = self.config
        alphas = round_alphas(config, round_number)
        if distributed.is_main():
            logger.info("round %d (%s): loss %s, alphas %s, chain pi_%s", round_number,
                        config.rounds[round_number - 1].name, config.method.loss, alphas,
                        chain_models(config, round_number))
        controller = adaptive_alpha.for_round(self, round_number)
        metrics = train_lora_stage(
            base_dir=self.model_dirs[round_number - 1],
            stage_dir=round_dir(config, round_number),
            tokenizer=self.tokenizer,
            objective=PreferenceObjective.from_method(config.method, alphas, fused=self.training.fused_lm_head),
            train=self.round_data(round_number, "train"),
            eval=self.round_data(round_number, "eval"),
            lora=config.lora,
            training=self.training,
            model_dtype=config.model.dtype,
            device=self.device,
            fingerprint=self.round_fingerprint(round_number),
            seed=self.training.seed + round_number,
            name=f"round {round_number}/{len(config.rounds)} {config.rounds[round_number - 1].name}",
            round_number=round_number,
            callback=self.callback if controller is None else _both(controller, self.callback),
        )
        self.callback("round_done", {"round": round_number, "dir": round_dir(config, round_number)})
        return metrics


def run_sequential(
    config,
    *,
    callback: Callable[[str, dict], None] | None = None,
    recompute_stale_cache: bool | None = None,
) -> SequentialResult:
    """Train every round of ``config`` (a path, dict or :class:`SequentialConfig`), resuming
    whatever an earlier run left. ``callback(event, info)`` is called on ``"step"``,
    ``"logprobs_computed"`` (every process), ``"cache_saved"`` (process 0) and ``"round_done"``
    (tests use it to simulate a crash). Under ``torchrun`` / ``accelerate launch`` the process
    group is started here if it is not yet."""
    config = load_config(config, task="preference")
    if recompute_stale_cache is not None:
        config.recompute_stale_cache = recompute_stale_cache
    with start_run(config):
        run = SequentialRun(config, callback)
        metrics = []
        for n in run.round_numbers:
            stop_if_requested(f"before round {n}")
            run.cache_frozen_logprobs(n - 1)  # pi_{n-1} is final now: cache it for rounds n..K
            if run.finished(n) or run.reuse_finished_round(n):
                if distributed.is_main():
                    logger.info("round %d (%s): already finished, skipped", n, config.rounds[n - 1].name)
                    shutil.rmtree(round_dir(config, n) / "checkpoints", ignore_errors=True)  # if killed before cleanup
                metrics.append(read_json(round_dir(config, n) / "metrics.json", remedy=(
                    f"delete {round_dir(config, n) / STATE_FILE} to train round {n} again")))
                continue
            metrics.append(run.train_round(n))
    round_dirs = [round_dir(config, n) for n in run.round_numbers]
    return SequentialResult(round_dirs=round_dirs, final_model_dir=round_dirs[-1] / "model", metrics=metrics)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _both(first: Callable[[str, dict], None], second: Callable[[str, dict], None]) -> Callable[[str, dict], None]:
    def callback(event: str, info: dict) -> None:
        first(event, info)
        second(event, info)
    return callback


def summary(result: SequentialResult) -> list[str]:
    lines = []
    for n, (directory, metrics) in enumerate(zip(result.round_dirs, result.metrics), start=1):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.get("eval", {}).items())
        lines.append(f"round {n}: {directory}" + (f"  eval: {shown}" if shown else ""))
    return lines + [f"final model: {result.final_model_dir}"]
