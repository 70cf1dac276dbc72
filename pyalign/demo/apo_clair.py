"""The APO/CLAIR paper's Table 1 in small: ``python -m pyalign.demo.apo_clair [--quick] [--out DIR]
[--config YAML] [--threads N]`` (``make demo-apo``; docs/experiments.md).

M = SmolLM2-135M-Instruct (``--quick``: a tiny random chat model), on checkable questions
(:mod:`pyalign.demo.checkable`). Four preference data sets from the same training questions
(:mod:`pyalign.demo.apo_clair_data`: CLAIR, on-policy judge, off-policy judge, stronger
preferred), each trained from M with every objective of ``objectives`` (DPO, APO-zero,
APO-down, SFT on the chosen answers; KTO-pair by ``--config``), the same LoRA and training
settings for every run. Measured: greedy held-out accuracy (Wilson 95%), mean answer length and
the change of the mean log-probability of the chosen and of the rejected training answers.

Prints the data-set table and the run table, writes ``apo_clair.png`` (accuracy per data set x
objective with intervals) and ``apo_clair.json``, and prints the JSON's path last. Re-running
with the same ``--out`` reuses every finished stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from pyalign.demo.apo_clair_data import DATASETS, build_datasets
from pyalign.demo.apo_clair_train import greedy_eval, load, mean_change, pair_logprobs, source_model, train
from pyalign.demo.checkable import SYSTEM, split_tasks
from pyalign.demo.runner import Clock, demo_main
from pyalign.demo.spo_experiment import load_settings
from pyalign.io import write_json_atomic

log = logging.getLogger("pyalign.demo")
FULL: dict = {
    "model": "smollm2",  # or "tiny"
    "tasks": {"train": 128, "eval": 300, "seed": 0},
    "max_new_tokens": 24,  # every sample's and every greedy answer's budget
    "sampling": {"temperature": 0.7, "top_p": 1.0, "batch_size": 64, "seed": 0},  # M's samples (CLAIR y_l, judge)
    "judge_draws": 2,  # draws of two samples per question for the judge data sets (a tie: the next draw)
    "off_policy": {"temperature": 1.2},  # the worse model: M at a high temperature
    "clair_filters": {"min_length_ratio": 0.5, "max_length_ratio": 2.0},  # the pipeline's defaults
    "pairs_per_dataset": 40,
    "objectives": ["dpo", "apo_zero", "apo_down", "sft"],
    "beta": 0.1,
    "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "training": {"lr": 1.0e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 64,
                 "max_prompt_length": 32, "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0, "device": "cpu",
                 "save_every": 0, "log_every": 4, "tensorboard": False, "progress_bar": False},
    "eval_batch_size": 64,
    "keep_models": False,  # delete each run's merged model once evaluated (the LoRA adapter stays)
    "priority": [],  # "dataset.objective" runs to do first (the rest follow data set by data set)
}
QUICK_OVERRIDES: dict = {
    "model": "tiny",
    "tasks": {"train": 24, "eval": 12},
    "max_new_tokens": 6,
    "sampling": {"batch_size": 32},
    "pairs_per_dataset": 6,
    "lora": {"r": 4, "alpha": 16},
    "training": {"lr": 1.0e-2, "batch_size": 2, "max_length": 48, "max_prompt_length": 32, "log_every": 1},
    "eval_batch_size": 16,
}


def settings_for(quick: bool, config: str | None) -> dict:
    return load_settings(FULL, QUICK_OVERRIDES, quick, config)


def run_row(dataset: str, objective: str, result: dict, before, after) -> dict:
    return {"dataset": dataset, "objective": objective, "accuracy": result["accuracy"],
            "accuracy_ci": result["accuracy_ci"], "mean_length": result["mean_length"], "score": result["score"],
            "chosen_logp_change": mean_change(after[0], before[0]),
            "rejected_logp_change": mean_change(after[1], before[1])}


def dataset_table(stats: list[dict]) -> str:
    lines = ["| data set | pairs (available) | edit distance (tokens) | y_w correct | y_l correct | "
             "y_w better than M's greedy answer | tokens y_w / y_l |", "|---|---|---|---|---|---|---|"]
    for s in stats:
        if not s["pairs"]:
            lines.append(f"| {s['name']} | 0 | - | - | - | - | - |")
            continue
        lines.append(f"| {s['name']} | {s['pairs']} ({s['pairs_available']}) | {s['edit_distance']:.1f} | "
                     f"{s['chosen_correct']:.2f} | {s['rejected_correct']:.2f} | {s['chosen_better_than_model']:.2f} | "
                     f"{s['chosen_tokens']:.1f} / {s['rejected_tokens']:.1f} |")
    return "\n".join(lines)


def run_table(base: dict, runs: list[dict]) -> str:
    lines = ["| data set | objective | accuracy [95% CI] | mean length | d logp chosen | d logp rejected |",
             "|---|---|---|---|---|---|",
             f"| (M, before) | - | {base['accuracy']:.3f} [{base['accuracy_ci'][0]:.3f}, {base['accuracy_ci'][1]:.3f}] "
             f"| {base['mean_length']:.1f} | - | - |"]
    for r in runs:
        lines.append(f"| {r['dataset']} | {r['objective']} | {r['accuracy']:.3f} "
                     f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}] | {r['mean_length']:.1f} | "
                     f"{r['chosen_logp_change']:+.2f} | {r['rejected_logp_change']:+.2f} |")
    return "\n".join(lines)


def plot(base: dict, runs: list[dict], objectives: list[str], path: Path) -> Path:
    """Accuracy per data set x objective with 95% intervals; M's accuracy and interval as a band."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from pyalign.io import save_figure_atomic  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(objectives)
    for k, objective in enumerate(objectives):
        xs, ys, errors = [], [], [[], []]
        for d, dataset in enumerate(DATASETS):
            row = next((r for r in runs if r["dataset"] == dataset and r["objective"] == objective), None)
            if row is None:
                continue
            xs.append(d + (k - (len(objectives) - 1) / 2) * width)
            ys.append(row["accuracy"])
            errors[0].append(row["accuracy"] - row["accuracy_ci"][0])
            errors[1].append(row["accuracy_ci"][1] - row["accuracy"])
        axis.bar(xs, ys, width, yerr=errors, capsize=3, label=objective)
    axis.axhspan(*base["accuracy_ci"], color="grey", alpha=0.2)
    axis.axhline(base["accuracy"], color="grey", linestyle="--", label="M (before)")
    axis.set_xticks(range(len(DATASETS)), DATASETS)
    axis.set_ylabel(f"held-out greedy accuracy ({base['questions']} questions)")
    axis.set_title("APO/CLAIR Table 1 in small: SmolLM2-135M-Instruct, 95% Wilson intervals")
    axis.legend(fontsize=8, ncol=len(objectives) + 1)
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def write_results(out: Path, base_eval: dict, stats, runs, facts, settings, clock, load_start, *, pending,
                  png: Path | None = None) -> Path:
    base_row = {k: base_eval[k] for k in ("accuracy", "accuracy_ci", "mean_length", "questions", "score")}
    payload = {"base": base_row, "datasets": stats, "runs": runs, "pending": pending, "samplers": facts,
               "plot": None if png is None else str(png), "settings": settings, "clock": clock.summary(),
               "load_average": {"start": [round(x, 2) for x in load_start],
                                "end": [round(x, 2) for x in os.getloadavg()]},
               "wall_time_s": clock.total()}
    return write_json_atomic(out / "apo_clair.json", payload)


def run(settings: dict, out: Path) -> Path:
    clock = Clock()
    load_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "settings.json", settings)
    tasks = settings["tasks"]
    train_tasks, eval_tasks = split_tasks(tasks["train"], tasks["eval"], seed=tasks["seed"])
    base = source_model(settings, out, train_tasks + eval_tasks)

    from pyalign.models import model_fingerprint  # noqa: PLC0415

    model, tokenizer = load(base)
    files, stats, facts = build_datasets(model, tokenizer, f"{base.resolve()}#{model_fingerprint(base)[:16]}",
                                         train_tasks, settings, out / "data")
    del model
    clock.lap("data")
    print(dataset_table(stats), flush=True)
    base_eval = greedy_eval(base, eval_tasks, settings, out / "eval" / "base.jsonl", system=SYSTEM, label="M")
    clock.lap("evaluation")
    grid = [f"{d}.{o}" for d in DATASETS if d in files for o in settings["objectives"]]
    unknown = [label for label in settings["priority"] if label not in grid]
    if unknown:
        raise ValueError(f"priority: {unknown} are not runs of this experiment ({', '.join(grid)})")
    order = list(dict.fromkeys(settings["priority"] + grid))
    runs = []
    for label in order:
            dataset, objective = label.split(".")
            before = pair_logprobs(base, files[dataset], settings, out / "logprobs" / f"base.{dataset}.pt")
            run_dir = out / "runs" / label
            measured = [out / "logprobs" / f"{label}.pt", out / "eval" / f"{label}.jsonl"]
            if all(f.is_file() for f in measured):  # a rerun: measured already (the model may be gone)
                model_dir = run_dir / "model"
            else:
                model_dir = train(objective, files[dataset], base, run_dir, settings,
                                  cache_dir=out / "logprob_cache" / dataset)
            clock.lap("training")
            after = pair_logprobs(model_dir, files[dataset], settings, measured[0])
            result = greedy_eval(model_dir, eval_tasks, settings, measured[1], system=SYSTEM, label=label)
            clock.lap("evaluation")
            runs.append(run_row(dataset, objective, result, before, after))
            if not settings["keep_models"]:
                shutil.rmtree(model_dir, ignore_errors=True)
            # after every run, so a run stopped early leaves what it measured (``pending``: not yet)
            path = write_results(out, base_eval, stats, runs, facts, settings, clock, load_start,
                                 pending=[label for label in order if label not in {f"{r['dataset']}.{r['objective']}"
                                                                                    for r in runs}])
    print(run_table(base_eval, runs), flush=True)
    path = write_results(out, base_eval, stats, runs, facts, settings, clock, load_start, pending=[],
                         png=plot(base_eval, runs, settings["objectives"], out / "apo_clair.png"))
    print(f"wall time {clock.total()} s; load average now {[round(x, 2) for x in os.getloadavg()]}", flush=True)
    return path


def main(argv=None) -> int:
    return demo_main(argv, prog="python -m pyalign.demo.apo_clair", description=__doc__,
                     default_out="outputs/apo_clair", settings_for=settings_for, run=run)


if __name__ == "__main__":
    sys.exit(main())
