"""Directional Preference Alignment on a real model with objectives a program checks:
``python -m pyalign.demo.dpa [--quick] [--out DIR] [--config YAML]`` (docs/dpa.md, "The demo").

1. pi_0: SmolLM2-135M-Instruct (``--quick``: a tiny random chat model).
2. Questions with short answers (:mod:`pyalign.demo.dpa_tasks`: arithmetic, unit conversion,
   capitals), split into rating, training and held-out prompts. True objectives:
   helpfulness = the response contains the correct answer (0/1), verbosity = its length in tokens.
3. Ratings: pi_0 answers the rating prompts (each with a direction from the training
   distribution in its system prompt, n samples), every sample is rated by the true objectives.
4. The reward model (``pyalign.reward_model``, ``pyalign train`` task ``reward_model``) learns
   them; its held-out MSE, Pearson r and pairwise accuracy are reported.
5. The DPA loop (``pyalign.tasks.dpa.loop``, task ``dpa``): T iterations of rejection sampling
   against the reward model and SFT on the best sample per (prompt, v), with the fronts of
   pi_0..pi_T on the held-out prompts by the reward model and by the true objectives.

Prints the front table of each iteration, the dominance of each iteration over the previous one,
the control check and the wall time, and as its last line the path of the results JSON. The
settings are :data:`FULL` / :data:`QUICK` (``configs/dpa_demo.yaml`` lists them); ``--config``
overrides any of them. Re-running with the same ``--out`` reuses every finished stage.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from pyalign.demo.dpa_outcomes import iteration_outcomes
from pyalign.demo.dpa_tasks import KINDS, Task, capped_true_ratings, make_tasks
from pyalign.demo.runner import Clock, demo_main, read_overrides
from pyalign.directions import direction_system_prompt, sample_angle_directions
from pyalign.io import read_jsonl_rows, write_json_atomic, write_jsonl_atomic

OBJECTIVES = ["helpfulness", "verbosity"]
# Directions on both sides of <1, 0>: on these tasks helpfulness and verbosity correlate negatively,
# so with the paper's range [-pi/4, 0] every direction wants the same answer (docs/dpa.md,
# "Directions of both signs").
BOTH_SIGNS = [-math.pi / 4, math.pi / 4]
# The settings under which the fine-tuned policy follows v (docs/dpa.md, "Arithmetic control: the
# settings search"); configs/dpa_demo_paper_settings.yaml restores the paper-like earlier defaults.
FULL: dict = {
    "model": "smollm2",  # or "tiny"
    "tasks": {"rating_prompts": 96, "train_prompts": 64, "eval_prompts": 24, "kinds": list(KINDS), "seed": 0},
    "max_new_tokens": 40,  # every sample's budget; verbosity's scale is [0, max_new_tokens]
    "system_prefix": "",
    "prompts_per_iteration": 16,  # of the half of train_prompts an iteration uses (None: all)
    # replay: which rated answers the SFT set replays (all: pi_0's answers as they come, like the
    # paper's original responses; helpful: only those rated helpful)
    # batch sizes (rows per generation batch) change speed only: the samples stay the same, but for a
    # rare token that a float rounding flips (docs/generation.md, "Reproducibility")
    "rating": {"samples_per_prompt": 4, "heldout_prompts": 24, "temperature": 1.0, "top_p": 0.9, "batch_size": 96,
               "replay": "all"},
    "reward_model": {
        "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1.0e-3, "epochs": 2, "batch_size": 16, "max_length": 96, "max_prompt_length": 48,
                     "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0, "device": "cpu", "save_every": 20,
                     "log_every": 5, "tensorboard": False, "progress_bar": True},
    },
    "dpa": {
        # words: SmolLM2-135M does not read the sign of `verbosity*-40`, it does read "less verbosity"
        "directions": {"per_prompt": 4, "sampler": "angle", "angle_range": BOTH_SIGNS, "prompt_style": "words"},
        # batch 96 = 12 prompts x 8 samples, or one evaluation chunk (48 rows x 2 samples)
        "sampling": {"n": 8, "temperature": 1.0, "top_p": 0.9, "batch_size": 96, "chunk_size": 48, "seed": 0},
        # one iteration: a second samples from the shorter pi_1 and loses the control (measured), and
        # would not fit the 20-minute budget on 2 cores
        "loop": {"iterations": 1, "restart_from_base": True, "fine_tune": "sft", "replay_fraction": 0.15,
                 "score_batch_size": 32},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        # 10 epochs (100 steps): 4-8 learn what the kept answers share, not how they differ with v; 20 overfit
        "training": {"lr": 1.0e-3, "epochs": 10, "batch_size": 8, "max_length": 128, "max_prompt_length": 80,
                     "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0, "device": "cpu", "save_every": 10,
                     "log_every": 5, "tensorboard": False, "progress_bar": True},
        "evaluation": {"directions": 10, "samples_per_prompt": 2, "temperature": 0.7, "seed": 1234,
                       "angle_range": BOTH_SIGNS},
    },
}
QUICK: dict = {
    "model": "tiny",
    "tasks": {"rating_prompts": 12, "train_prompts": 8, "eval_prompts": 3, "kinds": list(KINDS), "seed": 0},
    "max_new_tokens": 8,
    "system_prefix": "",
    "prompts_per_iteration": None,
    "rating": {"samples_per_prompt": 3, "heldout_prompts": 4, "temperature": 1.0, "top_p": 1.0, "batch_size": 32,
               "replay": "all"},
    "reward_model": {
        "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1.0e-2, "epochs": 1, "batch_size": 8, "max_length": 64, "max_prompt_length": 48,
                     "warmup_ratio": 0.0, "seed": 0, "device": "cpu", "save_every": 0, "log_every": 1,
                     "tensorboard": False, "progress_bar": False},
    },
    "dpa": {
        "directions": {"per_prompt": 2, "sampler": "angle"},
        "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "batch_size": 16, "chunk_size": 4, "seed": 0},
        "loop": {"iterations": 2, "restart_from_base": True, "fine_tune": "sft", "replay_fraction": 0.15,
                 "score_batch_size": 8},
        "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1.0e-2, "epochs": 1, "batch_size": 4, "max_length": 64, "max_prompt_length": 48,
                     "warmup_ratio": 0.0, "seed": 0, "device": "cpu", "save_every": 1, "log_every": 1,
                     "tensorboard": False, "progress_bar": False},
        "evaluation": {"directions": 4, "samples_per_prompt": 1, "temperature": 0.7, "seed": 1234},
    },
}
# Sections passed through to a trainer config (validated there, field by field).
_PASS_THROUGH = ("lora", "training", "directions", "sampling", "loop", "evaluation", "method")
log = logging.getLogger("pyalign.demo")


# ----------------------------------------------------------------------------- settings

def merge_settings(defaults: dict, overrides: dict, path: str = "") -> dict:
    """``defaults`` updated by ``overrides`` recursively; unknown keys are refused by name, except
    inside the sections a trainer config validates itself."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        where = f"{path}.{key}".lstrip(".")
        passthrough = path.split(".")[-1] in _PASS_THROUGH
        new_section = path == "dpa" and key in _PASS_THROUGH  # e.g. method, for loop.fine_tune: pairwise
        if key not in merged and not passthrough and not new_section:
            raise ValueError(f"{where}: unknown setting (known: {', '.join(merged)})")
        if isinstance(merged.get(key), dict) and not passthrough:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a mapping, got {value!r}")
            merged[key] = merge_settings(merged[key], value, where)
        elif isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if not path and merged.get("model") not in ("smollm2", "tiny"):
        raise ValueError(f"model: expected smollm2 or tiny, got {merged.get('model')!r}")
    return merged


def load_settings(quick: bool, config: str | None) -> dict:
    return merge_settings(QUICK if quick else FULL, read_overrides(config))


# ----------------------------------------------------------------------------- steps

def split_tasks(settings: dict) -> dict[str, list[Task]]:
    t = settings["tasks"]
    counts = {"rating": t["rating_prompts"], "train": t["train_prompts"], "eval": t["eval_prompts"]}
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"tasks.{name}_prompts: expected a positive integer, got {count!r}")
    if settings["rating"]["heldout_prompts"] >= counts["rating"]:
        raise ValueError(f"rating.heldout_prompts: must be below tasks.rating_prompts={counts['rating']}")
    tasks = make_tasks(sum(counts.values()), seed=t["seed"], kinds=t["kinds"])
    # Interleaved, so every split gets each kind in proportion.
    groups: dict[str, list[Task]] = {name: [] for name in counts}
    cursor = dict.fromkeys(counts, 0)
    for task in tasks:
        # the split whose share is filled least, first in (rating, train, eval) order on ties
        name = min((n for n in counts if cursor[n] < counts[n]),
                   key=lambda n: (cursor[n] / counts[n], list(counts).index(n)))
        groups[name].append(task)
        cursor[name] += 1
    return groups


def source_model(settings: dict, out: Path, tasks: dict[str, list[Task]]) -> Path:
    if settings["model"] == "smollm2":
        from pyalign.models import smollm2_path  # noqa: PLC0415

        return smollm2_path()
    from pyalign.demo.tiny_model import save_tiny_chat_model  # noqa: PLC0415

    folder = out / "tiny_model"
    if not (folder / "config.json").is_file():
        numbers = " ".join(str(i) for i in range(-100, 101))
        texts = [t.prompt + " " + t.answer for group in tasks.values() for t in group]
        texts.append(direction_system_prompt((1, 0), OBJECTIVES) + " " + numbers + " *-")
        save_tiny_chat_model(folder, extra_texts=texts)
    return folder


def prompt_file(path: Path, tasks: list[Task], max_tokens: int) -> Path:
    return write_jsonl_atomic(path, [{**t.to_record(), "max_tokens": max_tokens} for t in tasks])


def rating_data(settings: dict, model_dir: Path, tasks: list[Task], out: Path) -> tuple[Path, Path]:
    """pi_0's samples on the rating prompts (each prompt with one training-distribution
    direction in its system prompt), rated by the true objectives; split by prompt into the
    reward model's training and held-out files."""
    from pyalign.generation import generate_jsonl  # noqa: PLC0415
    from pyalign.models import load_model_and_tokenizer  # noqa: PLC0415

    rating, max_tokens = settings["rating"], settings["max_new_tokens"]
    directions = sample_angle_directions(len(tasks), seed=settings["tasks"]["seed"] + 17)
    systems = [direction_system_prompt(v, OBJECTIVES, prefix=settings["system_prefix"]) for v in directions]
    samples_file = out / "rating" / "samples.jsonl"
    model, tokenizer = load_model_and_tokenizer(model_dir)
    rows = generate_jsonl(samples_file, model, tokenizer, [t.prompt for t in tasks], system=systems,
                          n=rating["samples_per_prompt"], max_new_tokens=max_tokens, temperature=rating["temperature"],
                          top_p=rating["top_p"], seed=settings["tasks"]["seed"], batch_size=rating["batch_size"],
                          progress="rating samples")
    del model
    records = []
    for task, samples in zip(tasks, rows):
        for sample in samples:
            records.append({"prompt": task.prompt, "response": sample.text,
                            "ratings": capped_true_ratings(task, sample.text, tokenizer, max_tokens)})
    per_prompt = rating["samples_per_prompt"]
    cut = (len(tasks) - rating["heldout_prompts"]) * per_prompt
    train = write_jsonl_atomic(out / "rating" / "ratings.jsonl", records[:cut])
    heldout = write_jsonl_atomic(out / "rating" / "ratings_heldout.jsonl", records[cut:])
    return train, heldout


def replay_file(settings: dict, ratings: Path, out: Path) -> Path:
    """The original responses the SFT set replays (``rating.replay``): every rated training
    answer, or only those rated helpful."""
    choice = settings["rating"]["replay"]
    if choice == "all":
        return ratings
    if choice != "helpful":
        raise ValueError(f"rating.replay: expected 'all' or 'helpful', got {choice!r}")
    helpful = [r for r in read_jsonl_rows(ratings) if r["ratings"]["helpfulness"] >= 1]
    if not helpful:
        raise ValueError(f"rating.replay: 'helpful' but no answer in {ratings} is rated helpful")
    return write_jsonl_atomic(out / "rating" / "replay_helpful.jsonl", helpful)


def train_reward_model(settings: dict, model_dir: Path, train: Path, heldout: Path, out: Path):
    from pyalign.tasks.reward_model.run import run_reward_model  # noqa: PLC0415

    config = {
        "model": {"path": str(model_dir)},
        "objectives": {"helpfulness": [0, 1], "verbosity": [0, settings["max_new_tokens"]]},
        "data": {"train": str(train), "eval": str(heldout)},
        "output_dir": str(out / "reward_model"),
        **copy.deepcopy(settings["reward_model"]),
    }
    return run_reward_model(config)


def dpa_config(settings: dict, model_dir: Path, reward_model_dir: Path, files: dict[str, Path], replay: Path,
               out: Path) -> dict:
    dpa = copy.deepcopy(settings["dpa"])
    dpa["sampling"]["max_new_tokens"] = settings["max_new_tokens"]
    dpa["directions"]["system_prefix"] = settings["system_prefix"]
    dpa["evaluation"]["true_ratings"] = "pyalign.demo.dpa_tasks:rate_record"
    return {
        "task": "dpa",
        "model": {"path": str(model_dir)},
        "reward_model": str(reward_model_dir),
        "objectives": OBJECTIVES,
        "prompts": {"train": str(files["train"]), "eval": str(files["eval"]), "replay": str(replay),
                    "per_iteration": settings["prompts_per_iteration"]},
        "output_dir": str(out / "dpa"),
        **dpa,
    }


# ----------------------------------------------------------------------------- report

def examples(dpa_dir: Path, iteration: int, count: int = 2) -> list[dict]:
    """A few held-out answers of one iteration at the two ends of the direction range."""
    rows = read_jsonl_rows(dpa_dir / "evaluation" / f"iteration_{iteration}" / "scored.jsonl")
    if not rows:
        return []
    ends = {tuple(rows[0]["v"]), tuple(rows[-1]["v"])}
    picked = [r for r in rows if tuple(r["v"]) in ends][: 2 * count]
    return [{"prompt": r["prompt"], "system": r["system"], "response": r["samples"][0]["text"],
             "true": r["samples"][0].get("true")} for r in picked]


def selection_diagnostics(dpa_dir: Path, iteration: int, tasks: dict[str, Task], tokenizer, max_tokens: int) -> dict:
    """What the fine-tune of one iteration learns from: the true objectives (0-100) of every
    sample and of the kept ones, and how the kept responses' verbosity follows the direction
    (Spearman of v[1] with the kept sample's true verbosity over the (prompt, v) rows). If the
    kept set carries no such dependence, no amount of fine-tuning can teach control."""
    from pyalign.tasks.dpa.evaluate import spearman  # noqa: PLC0415

    rows = read_jsonl_rows(dpa_dir / f"iteration_{iteration}" / "scored.jsonl")
    if not rows:
        return {}

    def true(row, sample):
        r = capped_true_ratings(tasks[row["prompt"]], sample["text"], tokenizer, max_tokens)
        return [100.0 * r["helpfulness"], 100.0 * r["verbosity"] / max_tokens]

    every = [true(row, s) for row in rows for s in row["samples"]]
    kept = [true(row, max(row["samples"], key=lambda s: s["weighted"])) for row in rows]
    mean = lambda values, k: sum(v[k] for v in values) / len(values)  # noqa: E731
    weights = [row["v"][1] for row in rows]
    rho = spearman(weights, [k[1] for k in kept]) if len(set(weights)) > 1 else float("nan")
    return {"rows": len(rows), "samples": len(every),
            "all_samples_true": {"helpfulness": mean(every, 0), "verbosity": mean(every, 1)},
            "kept_true": {"helpfulness": mean(kept, 0), "verbosity": mean(kept, 1)},
            "spearman_v1_kept_verbosity": None if math.isnan(rho) else rho}


def run_demo(settings: dict, out: str | os.PathLike) -> Path:
    """The whole demo; returns the path of the results JSON."""
    from pyalign.tasks.dpa.loop import run_dpa  # noqa: PLC0415
    from pyalign.tasks.dpa.evaluate import front_table  # noqa: PLC0415

    clock = Clock()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = split_tasks(settings)
    model_dir = source_model(settings, out, tasks)
    files = {name: prompt_file(out / "prompts" / f"{name}.jsonl", group, settings["max_new_tokens"])
             for name, group in tasks.items()}
    clock.lap("model and prompts")
    ratings, heldout = rating_data(settings, model_dir, tasks["rating"], out)
    clock.lap("rating samples")
    reward = train_reward_model(settings, model_dir, ratings, heldout, out)
    clock.lap("reward model")
    config = dpa_config(settings, model_dir, reward.model_dir, files, replay_file(settings, ratings, out), out)
    write_json_atomic(out / "dpa_config.json", config)
    result = run_dpa(config)
    clock.lap("dpa loop")

    fronts = result.fronts
    iterations = [{"iteration": it["iteration"], "model": it["model"], "front": it["front"],
                   "control": it["control"]} for it in fronts["iterations"]]
    heldout_metrics = _without_nan(reward.heldout)
    from pyalign.models import load_tokenizer  # noqa: PLC0415

    by_prompt = {t.prompt: t for group in tasks.values() for t in group}
    tokenizer = load_tokenizer(model_dir)
    selection = {f"iteration_{t}": selection_diagnostics(out / "dpa", t, by_prompt, tokenizer, settings["max_new_tokens"])
                 for t in range(1, len(fronts["iterations"]))}
    outcomes = iteration_outcomes(out / "dpa", [it["iteration"] for it in iterations])
    timings = {**clock.wall, "total": clock.total()}
    payload = {
        "reward_model": {"heldout": heldout_metrics, "path": str(reward.model_dir)},
        "iterations": iterations,
        "control": {k: fronts["control"][k] for k in ("objective", "spearman", "p_value", "source", "weights", "means")},
        "dominance": fronts["dominance"],
        "selection": selection,
        "outcomes": outcomes,
        "examples": {f"iteration_{it['iteration']}": examples(out / "dpa", it["iteration"]) for it in iterations},
        "wall_time_s": timings["total"],
        "timings_s": timings,
        "cpu_seconds": {**clock.cpu, "process_total": round(time.process_time(), 1)},
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": settings.get("_load_average"),
        "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
        "plot": str(result.plot),
        "fronts_file": str(result.fronts_file),
    }
    json_path = write_json_atomic(out / "dpa_demo.json", payload)

    name = f"DPA demo ({settings['model']}, {len(tasks['eval'])} held-out prompts)"
    print(f"\n## {name}\n")
    print("Reward model, held-out (0-100 scale):\n")
    print("| objective | MSE | Pearson r | pairwise accuracy (pairs) |\n|---|---|---|---|")
    for objective, m in heldout_metrics.items():
        print(f"| {objective} | {m['mse']:.1f} | {_num(m['pearson'])} | {_num(m['pairwise_accuracy'])} ({m['pairs']}) |")
    for it in iterations:
        print(f"\nFront of iteration {it['iteration']} (means over held-out answers; J = v . mean):\n")
        print(front_table(it["front"], OBJECTIVES))
    for d in fronts["dominance"]:
        parts = [f"{src}: {d[src]['improved']}/{d[src]['directions']} directions improved"
                 f"{' (dominates)' if d[src]['dominates'] else ''}" for src in ("reward_model", "true") if src in d]
        print(f"\niteration {d['iteration']} vs {d['previous']}: " + "; ".join(parts))
    print("\nWhat each fine-tune learned from (true objectives, 0-100; Spearman of v[1] with the kept "
          "answer's verbosity):\n")
    print("| iteration | all samples: helpfulness / verbosity | kept: helpfulness / verbosity | Spearman |\n|---|---|---|---|")
    for name, d in selection.items():
        print(f"| {name.split('_')[1]} | {d['all_samples_true']['helpfulness']:.1f} / {d['all_samples_true']['verbosity']:.1f} "
              f"| {d['kept_true']['helpfulness']:.1f} / {d['kept_true']['verbosity']:.1f} "
              f"| {_num(d['spearman_v1_kept_verbosity'])} |")
    control = fronts["control"]
    print(f"\ncontrol (last iteration): Spearman(v[{control['objective']}], mean {control['source']} "
          f"{control['objective']}) = {_num(control['spearman'])} (permutation p = {_num(control['p_value'])}); "
          "per iteration: " + ", ".join(f"{it['iteration']}: {_num(it['control']['spearman'])} "
                                       f"(p {_num(it['control']['p_value'])})" for it in iterations))
    print("\nHeld-out outcomes (95% intervals; changes and the verbosity gap by a bootstrap over prompts):\n")
    for name, o in outcomes.items():
        change = (f" ({o['helpfulness_change_from_pi0']:+.1f} points vs pi_0, "
                  f"[{o['helpfulness_change_interval'][0]:+.1f}, {o['helpfulness_change_interval'][1]:+.1f}])"
                  if "helpfulness_change_from_pi0" in o else "")
        gap = ("n/a (no direction with v[1] > 0)" if o["verbosity_gap"] is None else
               f"{o['verbosity_gap']:+.1f} [{o['verbosity_gap_interval'][0]:+.1f}, {o['verbosity_gap_interval'][1]:+.1f}]")
        print(f"- iteration {name.split('_')[1]}: true helpfulness {o['helpfulness']:.1f}% [{o['helpfulness_interval'][0]:.1f}, "
              f"{o['helpfulness_interval'][1]:.1f}] of {o['answers']}{change}; mean verbosity of directions with "
              f"v[1] > 0 minus v[1] < 0: {gap}")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in clock.wall.items())
    print(f"wall time {timings['total']:.0f} s ({phases})")
    print(f"plot: {result.plot}")
    return json_path


def _without_nan(value):
    """NaN (e.g. a Pearson r of a constant) as None, so the JSON is standard JSON."""
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _num(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main(argv=None) -> int:
    def settings_for(quick: bool, config: str | None) -> dict:
        return {**load_settings(quick, config), "_load_average": list(os.getloadavg())}

    return demo_main(argv, prog="python -m pyalign.demo.dpa", description=__doc__, default_out="outputs/dpa_demo",
                     settings_for=settings_for, run=run_demo)


if __name__ == "__main__":
    sys.exit(main())
