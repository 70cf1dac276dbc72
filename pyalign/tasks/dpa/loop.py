"""Directional Preference Alignment: ``pyalign train CONFIG.yaml`` with ``task: dpa`` (docs/dpa.md).

Iterations t = 1..T, each one a chain of stages whose outputs are files::

    prompts of half (t-1) mod 2 -> m directions per prompt (plan.json)
      -> n samples per (prompt, v) from pi_{t-1}(. | x, v)          samples.jsonl  (row by row)
      -> reward-model scores r and v . r of every sample           scored.jsonl   (row by row)
      -> the best sample per (prompt, v) [+ replay]                chosen.jsonl, train.jsonl
         (pairwise fine-tune: best vs worst)                        pairs.jsonl, train.jsonl
      -> LoRA fine-tune of pi_0 (or pi_{t-1}), merged: pi_t        fine_tune/model/
    evaluation of pi_0..pi_T on the held-out prompts               evaluation/iteration_<t>/front.json
    fronts of every iteration, control check, PNG                   fronts.json, fronts.png

Resuming: every file is written atomically or row by row (:mod:`pyalign.io`); a rerun keeps the
complete rows of generation and scoring (in chunks: only unfinished chunks are redone), the
fine-tune continues from its last checkpoint, and finished stages are skipped after checking
that they were made from the same inputs (``plan.json`` / ``front.json`` / the fine-tune's
``state.json`` carry fingerprints of the models, data and settings; a mismatch is refused, not
reused). Samples are seeded per row (:mod:`pyalign.generation`), reward-model batches are the
same fixed chunks in every run, and training resumes bit for bit, so a resumed run ends with
what an uninterrupted one computes.

Under ``torchrun`` every process generates and scores its shard of each chunk and trains its
share of each batch; process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pyalign import distributed
from pyalign.data import PreferenceDataset, file_fingerprint, tokenization_fingerprint
from pyalign.generation import GenerationSettings, generate_jsonl, load_for_generation
from pyalign.io import JsonlAppender, read_json, read_jsonl_rows, write_json_atomic, write_jsonl_atomic
from pyalign.models import load_model, load_tokenizer, model_fingerprint, resolve_device, uses_autocast
from pyalign.reward_model.model import reward_model_fingerprint
from pyalign.tasks.dpa.config import DPAConfig, resolve_callable
from pyalign.tasks.dpa.data import (
    best_worst_pairs, chosen_examples, iteration_prompts, load_prompt_rows, plan_rows, replay_examples, replay_pool,
    scored_samples, sft_rows,
)
from pyalign.tasks.dpa.evaluate import evaluate_policy, front_table, write_fronts
from pyalign.train import (
    CacheKey, ConfigError, FrozenLogprobs, LogprobCache, PairsWithFrozenLogprobs, PreferenceObjective, SFTObjective,
    dataset_logprobs, load_config, lora_fingerprint, shard_model, stage_finished, start_run, stop_if_requested,
    train_lora_stage, training_fingerprint,
)

logger = logging.getLogger("pyalign.train")
STATE_FILE = "state.json"
# Generation/scoring settings that change how fast, not what: left out of the fingerprints.
_SPEED_ONLY = ("batch_size", "chunk_size")


@dataclass
class DPAResult:
    output_dir: Path
    model_dirs: list[Path]  # pi_0 .. pi_T
    fronts: dict | None = None  # fronts.json (None without evaluation prompts)
    fronts_file: Path | None = None
    plot: Path | None = None
    iteration_metrics: list[dict] = field(default_factory=list)

    @property
    def final_model_dir(self) -> Path:
        return self.model_dirs[-1]


class DPARun:
    """The state one run shares between its stages; see :func:`run_dpa`."""

    def __init__(self, config: DPAConfig, callback: Callable[[str, dict], None] | None):
        self.config = config
        self.callback = callback or (lambda event, info: None)
        self.device = distributed.process_device(resolve_device(config.training.device))
        self.output_dir = Path(config.output_dir)
        self.tokenizer = load_tokenizer(config.model.path)
        self.train_rows = load_prompt_rows(config.prompts.train, field="prompts.train")
        self.eval_rows = (load_prompt_rows(config.prompts.eval, field="prompts.eval")
                          if config.prompts.eval else None)
        replay_source = (load_prompt_rows(config.prompts.replay, field="prompts.replay")
                         if config.prompts.replay else self.train_rows)
        self.replay = replay_pool(replay_source)
        if config.loop.fine_tune == "sft" and config.loop.replay_fraction > 0 and not self.replay:
            where = "prompts.replay" if config.prompts.replay else "prompts.train"
            raise ConfigError(f"loop.replay_fraction: {config.loop.replay_fraction} needs original responses, "
                              f"but no row of {where} has a non-empty 'response' (set loop.replay_fraction: 0 "
                              "or give prompts.replay)")
        self.true_ratings = (resolve_callable("evaluation.true_ratings", config.evaluation.true_ratings)
                             if config.evaluation.true_ratings else None)
        self.model_dirs = [Path(config.model.path)] + [self.stage_dir(t) / "model"
                                                       for t in range(1, config.loop.iterations + 1)]
        self._fingerprints: dict[str, str] = {}
        self._reward_model = None

    # ------------------------------------------------------------------ paths and identities
    def iteration_dir(self, t: int) -> Path:
        return self.output_dir / f"iteration_{t}"

    def stage_dir(self, t: int) -> Path:
        return self.iteration_dir(t) / "fine_tune"

    def eval_dir(self, t: int) -> Path:
        return self.output_dir / "evaluation" / f"iteration_{t}"

    def model_fingerprint(self, t: int) -> str:
        key = str(self.model_dirs[t])
        if key not in self._fingerprints:
            self._fingerprints[key] = model_fingerprint(self.model_dirs[t])
        return self._fingerprints[key]

    def reward_model_fingerprint(self) -> str:
        if "reward_model" not in self._fingerprints:
            self._fingerprints["reward_model"] = reward_model_fingerprint(self.config.reward_model)
        return self._fingerprints["reward_model"]

    @property
    def reward_model(self):
        if self._reward_model is None:
            from pyalign.reward_model import load_reward_model  # noqa: PLC0415

            self._reward_model = load_reward_model(self.config.reward_model, objectives=self.config.objectives,
                                                   device=self.device)
        return self._reward_model

    def check_plan(self, file: Path, key: dict, what: str) -> None:
        """Write ``key`` to ``file``, or check that the one there is the same."""
        key = json.loads(json.dumps(key))
        stored = read_json(file)["key"] if file.is_file() else None
        # Every process looks before process 0 writes, and every process takes both barriers:
        # a process that looked after the write would otherwise skip one and deadlock the next
        # collective (seen under torchrun when process 1 started later than process 0).
        distributed.barrier()
        if stored is not None and stored != key:
            changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
            raise RuntimeError(f"{file}: {what} was started under different settings (changed: "
                               f"{', '.join(changed)}); use a new output_dir or delete {file.parent} "
                               "and the folders after it")
        if stored is None and distributed.is_main():
            write_json_atomic(file, {"key": key}, checksum=True)
        distributed.barrier()

    # ------------------------------------------------------------------ generation and scoring
    def generation_settings(self, evaluation: bool) -> dict:
        s, e = self.config.sampling, self.config.evaluation
        if evaluation:
            return {"n": e.samples_per_prompt, "max_new_tokens": e.max_new_tokens or s.max_new_tokens,
                    "temperature": e.temperature, "top_p": e.top_p, "top_k": 0, "seed": e.seed}
        return {"n": s.n, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed}

    def generate(self, path: Path, t_policy: int, rows: list[dict], settings: dict, info: dict) -> list[dict]:
        """Samples of pi_{t_policy} for every plan row, written row by row to ``path`` (a chunk
        at a time; finished chunks are not redone)."""
        prompts = [r["prompt"] for r in rows]
        systems = [r["system"] for r in rows]
        total, chunk = len(rows), self.config.sampling.chunk_size
        done = len(read_jsonl_rows(path))
        distributed.barrier()  # every process has counted before process 0 appends
        model = tokenizer = None
        for stop in range(chunk, total + chunk, chunk):
            stop = min(stop, total)
            if stop <= done:
                continue
            if model is None:
                model, tokenizer = load_for_generation(self.model_dirs[t_policy], backend=self.config.sampling.backend,
                                                       dtype=self.config.model.dtype)
                if isinstance(model, torch.nn.Module):
                    model.to(self.device)
            generate_jsonl(path, model, tokenizer, prompts[:stop], system=systems[:stop], do_sample=True,
                           batch_size=self.config.sampling.batch_size, chunk_size=chunk,
                           backend=self.config.sampling.backend, progress=f"{info['stage']} {info['iteration']}: sampling",
                           **settings)
            self.callback("generated", {**info, "rows": stop, "total": total})
        del model
        generated = read_jsonl_rows(path)
        fingerprint = GenerationSettings(**settings).fingerprint()
        if len(generated) != total or any(g["prompt"] != p or g["system"] != s or not g["settings"].startswith(fingerprint)
                                          for g, p, s in zip(generated, prompts, systems)):
            raise RuntimeError(f"{path}: does not hold the samples of this plan (a stale file: delete it)")
        return generated

    def score(self, path: Path, rows: list[dict], generated: list[dict], info: dict,
              prompt_records: list[dict] | None = None) -> list[dict]:
        """Reward-model scores (and, with ``prompt_records``, true ratings) of every sample,
        written row by row to ``path``. Scores are computed a whole chunk at a time, the same
        chunks in every run, so a resumed run batches exactly as an uninterrupted one."""
        total, chunk = len(rows), self.config.sampling.chunk_size
        done_rows = read_jsonl_rows(path)
        for i, row in enumerate(done_rows):
            if row.get("index") != i or row.get("prompt") != rows[i]["prompt"] or row.get("system") != rows[i]["system"]:
                raise RuntimeError(f"{path}: row {i} scores another prompt or direction (a stale file: delete it)")
        done = len(done_rows)
        distributed.barrier()
        # checksums: every score row carries a digest (scored.jsonl.sha256), so a damaged row is scored again
        with JsonlAppender(path, checksums=True) if distributed.is_main() and done < total \
                else contextlib.nullcontext() as out:
            for start in range((done // chunk) * chunk, total, chunk):
                stop = min(start + chunk, total)
                prompts = [rows[i]["prompt"] for i in range(start, stop) for _ in generated[i]["samples"]]
                texts = [s["text"] for i in range(start, stop) for s in generated[i]["samples"]]
                scores = self.reward_model.score(prompts, texts, batch_size=self.config.loop.score_batch_size,
                                                 progress=f"{info['stage']} {info['iteration']}: scoring").tolist()
                position = 0
                for i in range(start, stop):
                    n = len(generated[i]["samples"])
                    row_texts, row_scores = texts[position:position + n], scores[position:position + n]
                    position += n
                    if i < done:
                        continue
                    samples = scored_samples(row_texts, row_scores, rows[i]["v"])
                    if prompt_records is not None and self.true_ratings is not None:
                        record = prompt_records[rows[i]["prompt_index"]]
                        for sample in samples:
                            sample["true"] = self.rate_truly(record, sample["text"])
                    if out is not None:
                        out.write({"index": i, "prompt": rows[i]["prompt"], "system": rows[i]["system"],
                                   "v": rows[i]["v"], "samples": samples})
                self.callback("scored", {**info, "rows": stop, "total": total})
        distributed.barrier()
        return read_jsonl_rows(path)

    def rate_truly(self, record: dict, response: str) -> list[float]:
        """The task's true objectives of ``response``, on the reward model's 0-100 scale."""
        ratings = self.true_ratings(record, response, self.tokenizer)
        if not isinstance(ratings, dict):
            raise ValueError(f"evaluation.true_ratings: expected a dict of ratings, got {type(ratings).__name__}")
        values = []
        for scale in self.reward_model.scales:
            if scale.name not in ratings:
                raise ValueError(f"evaluation.true_ratings: returned no rating for the objective {scale.name!r} "
                                 f"(got {sorted(ratings)}) for the prompt {record['prompt']!r}")
            values.append(float(scale.to_100(float(ratings[scale.name]))))
        return values

    # ------------------------------------------------------------------ one iteration
    def plan(self, t: int) -> list[dict]:
        config = self.config
        rows = plan_rows(config, iteration_prompts(self.train_rows, t, config.prompts.per_iteration), t)
        self.check_plan(self.iteration_dir(t) / "plan.json", {
            "iteration": t, "policy": self.model_fingerprint(t - 1),
            "reward_model": self.reward_model_fingerprint(), "prompts": file_fingerprint(config.prompts.train),
            "objectives": config.objectives,
            # prompt_style keyed only when set, so that plans written before it existed stay valid
            "directions": config.directions.model_dump(
                exclude={"prompt_style"} if config.directions.prompt_style == "paper" else None),
            "per_iteration": config.prompts.per_iteration,
            "sampling": {k: v for k, v in config.sampling.model_dump().items() if k not in _SPEED_ONLY},
        }, f"iteration {t}")
        if distributed.is_main():
            write_jsonl_atomic(self.iteration_dir(t) / "directions.jsonl", rows)
        return rows

    def fine_tune_data(self, t: int, scored: list[dict]) -> dict:
        """Write the iteration's selection (chosen.jsonl or pairs.jsonl) and its training file."""
        config, directory = self.config, self.iteration_dir(t)
        if config.loop.fine_tune == "sft":
            chosen = chosen_examples(scored)
            replay = replay_examples(self.replay, len(chosen), config.loop.replay_fraction,
                                     seed=config.sampling.seed, iteration=t)
            selection, training_rows = ("chosen.jsonl", chosen), sft_rows(chosen) + sft_rows(replay)
            info = {"chosen": len(chosen), "replay": len(replay)}
        else:
            pairs, skipped = best_worst_pairs(scored)
            if not pairs:
                raise RuntimeError(f"iteration {t}: the best and worst samples tie for every (prompt, direction); "
                                   "no preference pairs to train on (more samples or a higher temperature?)")
            selection = ("pairs.jsonl", pairs)
            training_rows = [{k: p[k] for k in ("prompt", "system", "chosen", "rejected")} for p in pairs]
            info = {"pairs": len(pairs), "skipped_ties": skipped}
        if distributed.is_main():
            write_jsonl_atomic(directory / selection[0], selection[1])
            write_jsonl_atomic(directory / "train.jsonl", training_rows)
        distributed.barrier()
        self.callback("selected", {"iteration": t, **info})
        return info

    def fine_tune(self, t: int) -> dict:
        """Train pi_t on the iteration's training file (resumes its checkpoint)."""
        from pyalign.tasks.sft.data import SFTDataset  # noqa: PLC0415

        config, training = self.config, self.config.training
        base_index = 0 if config.loop.restart_from_base else t - 1
        train_file = self.iteration_dir(t) / "train.jsonl"
        fingerprint = self.fine_tune_fingerprint(t, base_index, train_file)
        if stage_finished(self.stage_dir(t), fingerprint, state_file=STATE_FILE, what=f"iteration {t}'s fine-tune"):
            return self.finished_metrics(t)
        if config.loop.fine_tune == "sft":
            data = SFTDataset.from_jsonl(train_file, self.tokenizer, training.max_length, training.max_prompt_length)
            objective = SFTObjective(fused=training.fused_lm_head)
        else:
            pairs = PreferenceDataset.from_jsonl(train_file, self.tokenizer, training.max_length,
                                                 training.max_prompt_length)
            objective = PreferenceObjective.from_method(config.method, [], fused=training.fused_lm_head)
            data = self.pairs_with_reference(t, base_index, train_file, pairs, objective.average)
        metrics = train_lora_stage(
            base_dir=self.model_dirs[base_index], stage_dir=self.stage_dir(t), tokenizer=self.tokenizer,
            objective=objective, train=data, lora=config.lora, training=training, model_dtype=config.model.dtype,
            device=self.device, fingerprint=fingerprint, seed=training.seed + t, name=f"dpa iteration {t}",
            round_number=t, callback=self.callback, state_file=STATE_FILE,
        )
        self.callback("fine_tuned", {"iteration": t, "model": self.stage_dir(t) / "model"})
        return metrics

    def fine_tune_fingerprint(self, t: int, base_index: int, train_file: Path) -> dict:
        config = self.config
        return {
            "task": "dpa", "iteration": t, "fine_tune": config.loop.fine_tune,
            "base_model": self.model_fingerprint(base_index), "train_data": file_fingerprint(train_file),
            "tokenization": tokenization_fingerprint(self.tokenizer, config.training.max_length,
                                                     config.training.max_prompt_length),
            "lora": lora_fingerprint(config.lora), "training": training_fingerprint(config.training),
            "method": config.method.model_dump() if config.loop.fine_tune == "pairwise" else None,
            "model_dtype": config.model.dtype,
        }

    def pairs_with_reference(self, t: int, base_index: int, train_file: Path, pairs, average: bool):
        """The pairs with the base model's log-probs (the reference of the pairwise loss),
        computed once and cached in the fine-tune folder under a key of everything they depend on."""

        training = self.config.training
        key = CacheKey(model_index=base_index, model_fingerprint=self.model_fingerprint(base_index), round_index=t,
                       split="train", data_fingerprint=file_fingerprint(train_file),
                       tokenization=tokenization_fingerprint(self.tokenizer, training.max_length,
                                                             training.max_prompt_length),
                       average=average,
                       precision=self.config.model.dtype + ("+bf16-autocast" if uses_autocast(
                           self.device, training.mixed_precision) else ""))
        cache = LogprobCache(self.stage_dir(t) / "logprob_cache", recompute_stale=True)
        entry = cache.load(key)
        distributed.barrier()  # every process has looked before process 0 writes (see check_plan)
        if entry is None:
            model = shard_model(load_model(self.model_dirs[base_index], self.config.model.dtype, self.device),
                                training, self.device)
            entry = dataset_logprobs(model, pairs, batch_size=training.eval_batch_size or training.batch_size,
                                     device=self.device, mixed_precision=training.mixed_precision, average=average,
                                     fused=training.fused_lm_head,
                                     progress=f"reference log-probs, iteration {t}" if training.progress_bar else None)
            del model
            if distributed.is_main():
                cache.save(key, *entry)
        distributed.barrier()
        return PairsWithFrozenLogprobs(pairs, FrozenLogprobs(entry[0][None], entry[1][None]))

    def finished_metrics(self, t: int) -> dict:
        return read_json(self.stage_dir(t) / "metrics.json",
                         remedy=f"delete {self.stage_dir(t) / STATE_FILE} to fine-tune iteration {t} again")

    def run_iteration(self, t: int) -> dict:
        rows = self.plan(t)
        train_file = self.iteration_dir(t) / "train.jsonl"
        base_index = 0 if self.config.loop.restart_from_base else t - 1
        if train_file.is_file() and stage_finished(self.stage_dir(t), self.fine_tune_fingerprint(t, base_index, train_file),
                                                   state_file=STATE_FILE, what=f"iteration {t}'s fine-tune"):
            logger.info("dpa iteration %d: already finished, skipped", t)
            return self.finished_metrics(t)
        info = {"stage": "iteration", "iteration": t}
        logger.info("dpa iteration %d: %d (prompt, direction) rows x %d samples from %s", t, len(rows),
                    self.config.sampling.n, self.model_dirs[t - 1])
        generated = self.generate(self.iteration_dir(t) / "samples.jsonl", t - 1, rows,
                                  self.generation_settings(evaluation=False), info)
        stop_if_requested(f"after sampling in DPA iteration {t}")
        scored = self.score(self.iteration_dir(t) / "scored.jsonl", rows, generated, info)
        stop_if_requested(f"after scoring in DPA iteration {t}")
        selection = self.fine_tune_data(t, scored)
        metrics = self.fine_tune(t)
        if distributed.is_main():
            write_json_atomic(self.iteration_dir(t) / "summary.json", {"iteration": t, **selection,
                                                                       "fine_tune": metrics.get("train", {})})
        return metrics


def run_dpa(config, *, callback: Callable[[str, dict], None] | None = None) -> DPAResult:
    """Run (or resume) every iteration of ``config`` (a path, dict or :class:`DPAConfig`) and
    evaluate pi_0..pi_T when there are evaluation prompts. ``callback(event, info)`` is called on
    ``"generated"``, ``"scored"`` (after each chunk), ``"selected"``, the trainer's ``"step"``,
    ``"fine_tuned"`` and ``"evaluated"`` (tests use it to simulate a crash)."""
    config = load_config(config, task="dpa")
    with start_run(config) as (_, output_dir):
        run = DPARun(config, callback)
        evaluate = run.eval_rows is not None
        evaluations = [evaluate_policy(run, 0)] if evaluate else []
        metrics = []
        for t in range(1, config.loop.iterations + 1):
            stop_if_requested(f"before DPA iteration {t}")
            metrics.append(run.run_iteration(t))
            if evaluate:
                evaluations.append(evaluate_policy(run, t))
        result = DPAResult(output_dir, run.model_dirs, iteration_metrics=metrics)
        if evaluate:
            result.fronts, result.fronts_file, result.plot = write_fronts(run, evaluations)
        return result


def summary(result: DPAResult) -> list[str]:
    lines = []
    if result.fronts is not None:
        objectives = result.fronts["objectives"]
        for iteration in result.fronts["iterations"]:
            lines += [f"iteration {iteration['iteration']} front ({iteration['model']}):",
                      front_table(iteration["front"], objectives)]
        control = result.fronts["control"]
        rho = "n/a" if control["spearman"] is None else f"{control['spearman']:+.3f}"
        lines.append(f"control: Spearman(v[{control['objective']}], mean {control['objective']} by "
                     f"{control['source']}) = {rho}")
        lines += [f"fronts: {result.fronts_file} ({result.plot})"]
    lines.append(f"final model: {result.final_model_dir}")
    return lines
