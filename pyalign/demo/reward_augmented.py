"""Reward-augmented data (Zhang et al.) in small: ``python -m pyalign.demo.reward_augmented
[--quick] [--out DIR] [--config YAML] [--threads N]`` (``make demo-ra``; docs/experiments.md).

M = SmolLM2-135M-Instruct (``--quick``: a tiny random chat model) on checkable questions
(:mod:`pyalign.demo.checkable`). Per training question a pool of four answers of mixed quality,
graded by the checker (:func:`pyalign.demo.checkable.grade`: correct and short 10, correct and
long 7, wrong 3 / 2 / 1 by how far off): two samples of M, the in-place correction of the first
(:func:`pyalign.demo.checkable.revise_answer`) and an independently written short answer. As
UltraFeedback is binarised, the chosen answer is a top-graded one and the rejected one is drawn
from those graded lower, so many rejected answers are correct (7).

The same scored pairs train (a) DPO and (b) DPO on their reward-augmented relabeling
(``relabel: reward_augmented``, score range 1-10); the relabelled model is asked for the top score
(10) and, to show it reads the condition, for the lowest (1). Reported: held-out mean score
(t 95%) and accuracy (Wilson 95%) of greedy answers, and the change of the log-probability of the
high-scored (>= 7) rejected training answers (the paper's "unlearning"): under DPO with the
training prompt, under the relabelled model with the prompt that asks for their own score (the
pair in which they are preferred) and with the top-score prompt. The JSON's path is printed last.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
from pathlib import Path

from pyalign.data.relabel import target_system_prompt
from pyalign.demo.apo_clair_train import greedy_eval, load, mean_change, pair_logprobs, sample, source_model, train
from pyalign.demo.checkable import (
    LOW_SCORE, SCORE_RANGE, SYSTEM, TOP_SCORE, grade, reference_answer, revise_answer, split_tasks, wilson_interval,
)
from pyalign.demo.dpa_tasks import Task
from pyalign.demo.runner import Clock, demo_main
from pyalign.demo.spo_experiment import load_settings
from pyalign.io import write_json_atomic, write_jsonl_atomic

log = logging.getLogger("pyalign.demo")
GOOD = 7  # a rejected answer graded at least this is correct: pushing it down is "unlearning"
FULL: dict = {
    "model": "smollm2",
    "tasks": {"train": 96, "eval": 300, "seed": 0},
    "max_new_tokens": 24,
    "sampling": {"temperature": 0.7, "top_p": 1.0, "batch_size": 64, "seed": 0},
    "pairs": 64,
    "beta": 0.1,
    "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "training": {"lr": 1.0e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 112,
                 "max_prompt_length": 80, "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0, "device": "cpu",
                 "save_every": 0, "log_every": 8, "tensorboard": False, "progress_bar": False},
    "eval_batch_size": 64,
    "keep_models": False,
}
QUICK_OVERRIDES: dict = {
    "model": "tiny",
    "tasks": {"train": 16, "eval": 12},
    "max_new_tokens": 6,
    "sampling": {"batch_size": 32},
    "pairs": 12,
    "lora": {"r": 4, "alpha": 16},
    "training": {"lr": 1.0e-2, "batch_size": 2, "max_length": 96, "max_prompt_length": 80, "log_every": 1},
    "eval_batch_size": 16,
}


def settings_for(quick: bool, config: str | None) -> dict:
    return load_settings(FULL, QUICK_OVERRIDES, quick, config)


def condition_system(score: int | None) -> str:
    """The system prompt of a condition: the plain one, or the relabeling's target score before it."""
    if score is None:
        return SYSTEM
    return target_system_prompt(score, score_range=SCORE_RANGE) + "\n\n" + SYSTEM


def scored_pairs(tasks: list[Task], samples: list[list[str]], *, seed: int) -> list[dict]:
    """Per question: the pool (two samples, the correction of the first, a reference answer),
    chosen = a top-graded answer, rejected = one graded lower, both drawn with a per-question
    seed (none when the pool ties)."""
    pairs = []
    for i, (task, texts) in enumerate(zip(tasks, samples)):
        pool = [texts[0], texts[1], revise_answer(task, texts[0]), reference_answer(task)]
        grades = [grade(task, t) for t in pool]
        rng = random.Random(f"ra-pairs:{seed}:{i}")
        best = max(grades)
        top = [k for k, g in enumerate(grades) if g == best]
        lower = [k for k, g in enumerate(grades) if g < best]
        if not lower:
            continue
        w, l = rng.choice(top), rng.choice(lower)
        pairs.append({"prompt": task.prompt, "chosen": pool[w], "rejected": pool[l], "system": SYSTEM,
                      "chosen_score": float(grades[w]), "rejected_score": float(grades[l]),
                      "meta": {"index": i, "kind": task.kind, "chosen_source": w, "rejected_source": l}})
    return pairs


def measurement_files(pairs: list[dict], folder: Path) -> dict[str, Path]:
    """Pairs files whose *chosen* side is the original rejected answer, under the prompt that asks
    for its own score (``own``) and for the top score (``top``): their log-probs measure what
    happened to the rejected answers in the relabelled model."""
    files = {}
    for name, score_of in (("own", lambda p: p["rejected_score"]), ("top", lambda p: TOP_SCORE)):
        rows = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"],
                 "system": condition_system(int(score_of(p)))} for p in pairs]
        files[name] = write_jsonl_atomic(folder / f"measure_{name}.jsonl", rows)
    return files


def runs_table(runs: list[dict]) -> str:
    lines = ["| method | condition | mean score [95% CI] | accuracy [95% CI] | mean length |", "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['condition'] or '-'} | {r['score']:.2f} [{r['score_ci'][0]:.2f}, "
                     f"{r['score_ci'][1]:.2f}] | {r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, "
                     f"{r['accuracy_ci'][1]:.3f}] | {r['mean_length']:.1f} |")
    return "\n".join(lines)


def run(settings: dict, out: Path) -> Path:
    clock = Clock()
    load_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "settings.json", settings)
    train_tasks, eval_tasks = split_tasks(settings["tasks"]["train"], settings["tasks"]["eval"],
                                          seed=settings["tasks"]["seed"])
    extra = [condition_system(s) for s in range(1, 11)]
    base = source_model(settings, out, train_tasks + eval_tasks, extra)
    model, tokenizer = load(base)
    samples = sample(out / "data" / "samples.jsonl", model, tokenizer, train_tasks, system=SYSTEM, n=2,
                     temperature=settings["sampling"]["temperature"], settings=settings, label="M samples")
    del model
    every = scored_pairs(train_tasks, samples, seed=settings["sampling"]["seed"])
    pairs = every[: settings["pairs"]]
    pairs_file = write_jsonl_atomic(out / "data" / "pairs.jsonl", pairs)
    good = [p["rejected_score"] >= GOOD for p in pairs]
    data = {"pairs": len(pairs), "pairs_available": len(every), "rejected_good": round(sum(good) / len(pairs), 4),
            "rejected_good_ci": wilson_interval(sum(good), len(pairs)),
            "chosen_score": round(sum(p["chosen_score"] for p in pairs) / len(pairs), 3),
            "rejected_score": round(sum(p["rejected_score"] for p in pairs) / len(pairs), 3)}
    print(f"pairs: {data}", flush=True)
    clock.lap("data")

    relabel = {"method": "reward_augmented", "score_range": list(SCORE_RANGE)}
    models = {}
    for method, spec in (("dpo", None), ("dpo_reward_augmented", relabel)):
        if (out / "runs" / f"{method}.measured").is_file():  # a rerun: measured already (the model may be gone)
            models[method] = out / "runs" / method
        else:
            models[method] = train("dpo", pairs_file, base, out / "runs" / method, settings,
                                   cache_dir=out / "logprob_cache" / method, relabel=spec)
    clock.lap("training")

    measure = measurement_files(pairs, out / "data")
    lp = {}
    for name, folder in (("base", base), *models.items()):
        lp[name, "plain"] = pair_logprobs(folder, pairs_file, settings, out / "logprobs" / f"{name}.plain.pt")
    for view in ("own", "top"):
        for name, folder in (("base", base), ("dpo_reward_augmented", models["dpo_reward_augmented"])):
            lp[name, view] = pair_logprobs(folder, measure[view], settings, out / "logprobs" / f"{name}.{view}.pt")
    unlearning = {"dpo": mean_change(lp["dpo", "plain"][1], lp["base", "plain"][1], good),
                  "dpo_reward_augmented": mean_change(lp["dpo_reward_augmented", "own"][0],
                                                      lp["base", "own"][0], good)}
    detail = {"rejected_answers": sum(good), "threshold": GOOD,
              "dpo_reward_augmented_top_prompt": mean_change(lp["dpo_reward_augmented", "top"][0],
                                                             lp["base", "top"][0], good),
              "dpo_reward_augmented_plain_prompt": mean_change(lp["dpo_reward_augmented", "plain"][1],
                                                               lp["base", "plain"][1], good),
              "dpo_low_rejected": mean_change(lp["dpo", "plain"][1], lp["base", "plain"][1], [not g for g in good]),
              "dpo_chosen": mean_change(lp["dpo", "plain"][0], lp["base", "plain"][0])}
    clock.lap("log-probs")

    runs = []
    for method, folder, conditions in (("base", base, (None, "top")), ("dpo", models["dpo"], (None,)),
                                       ("dpo_reward_augmented", models["dpo_reward_augmented"], ("top", "low"))):
        for condition in conditions:
            score = {None: None, "top": TOP_SCORE, "low": LOW_SCORE}[condition]
            result = greedy_eval(folder, eval_tasks, settings, out / "eval" / f"{method}.{condition or 'plain'}.jsonl",
                                 system=condition_system(score), label=f"{method} ({condition or 'plain'})")
            runs.append({"method": method, "condition": condition, "score": result["score"],
                         "score_ci": result["score_ci"], "accuracy": result["accuracy"],
                         "accuracy_ci": result["accuracy_ci"], "mean_length": result["mean_length"]})
            clock.lap("evaluation")
    for method, folder in models.items():
        (out / "runs" / f"{method}.measured").write_text("every log-prob and evaluation of this model is saved\n")
        if not settings["keep_models"]:
            shutil.rmtree(folder, ignore_errors=True)
    print(runs_table(runs), flush=True)
    print(f"unlearning (mean change of log p of the {sum(good)} rejected answers graded >= {GOOD}): {unlearning}; "
          f"{detail}", flush=True)
    payload = {"runs": runs, "unlearning": unlearning, "unlearning_detail": detail, "data": data,
               "settings": settings, "clock": clock.summary(),
               "load_average": {"start": [round(x, 2) for x in load_start],
                                "end": [round(x, 2) for x in os.getloadavg()]},
               "wall_time_s": clock.total()}
    path = write_json_atomic(out / "reward_augmented.json", payload)
    print(f"wall time {payload['wall_time_s']} s; load average {payload['load_average']}", flush=True)
    return path


def main(argv=None) -> int:
    return demo_main(argv, prog="python -m pyalign.demo.reward_augmented", description=__doc__,
                     default_out="outputs/reward_augmented", settings_for=settings_for, run=run)


if __name__ == "__main__":
    sys.exit(main())
