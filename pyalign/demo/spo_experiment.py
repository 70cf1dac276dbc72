"""What the two SPO demos share: settings, pi_0 with the slot tokens, the pairs of every
dimension, training runs and the evaluation of a model (teacher-forced metric + generation).

- :mod:`pyalign.demo.spo_markers` (``make demo``): four dimensions, SPO vs S-DPO, the paper's
  Table 4 on this design;
- :mod:`pyalign.demo.spo_alpha_sweep`: two dimensions, round 2 for several alphas and adaptive
  alpha, the paper's Table 2.

Both build pi_0 = the source model (SmolLM2-135M-Instruct, or ``model: tiny`` for tests) plus the
tokens ``[Token_i]``/``[Skip_i]``; sample one response per prompt from it (cached); write, per
dimension, training pairs (with ``conflict_rate`` of them in conflict with the earlier dimensions)
and conflict-free held-out pairs (:mod:`pyalign.demo.spo_data`); train with
:func:`pyalign.tasks.preference.rounds.run_sequential`; and score every round's model with
:class:`pyalign.demo.evaluate.TeacherForced` and :func:`pyalign.demo.evaluate.generation_metrics`.
docs/demo.md explains the design, the settings and what was measured.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from pyalign.demo.evaluate import EvalSettings, TeacherForced, generation_metrics, write_json
from pyalign.demo.markers import SYSTEM_PROMPT, SamplingSettings, model_fingerprint, sample_responses, split_prompts
from pyalign.demo.runner import read_overrides
from pyalign.demo.spo_data import dimension_pairs, marker_tokens
from pyalign.io import atomic_directory, write_jsonl_atomic
from pyalign.models import add_marker_tokens, load_model_and_tokenizer, models_cache_dir, smollm2_path

log = logging.getLogger("pyalign.demo")

# Settings both demos share (each demo adds its own: methods or alphas). The values are what
# docs/demo.md measured and explains.
COMMON: dict = {
    "model": "smollm2",  # or "tiny"
    "data": {
        "num_dimensions": 4,
        "num_train_prompts": 64,  # pairs per dimension (the same prompts, and texts, in every round)
        "num_eval_pairs": 32,  # held-out pairs per dimension (teacher-forced metric, adaptive alpha)
        "num_eval_prompts": 100,  # held-out prompts for generation
        "conflict_rate": 0.3,  # share of each later dimension's pairs in conflict with the earlier ones
        "other_prob": 0.5,  # probability of each non-deciding slot holding its marker (same on both sides)
        "seed": 0,
    },
    "sampling": {"num_per_prompt": 1, "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "batch_size": 64},
    "evaluation": {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "samples_per_prompt": 1,
                   "batch_size": 50},
    "method": {"beta": 0.1},
    "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "train_token_rows": False,  # true: the slot tokens' embedding rows are trained too (trainable_token_indices)
    # null: pi_0 is the source model plus the slot tokens. A mapping: pi_0 is that model after an SFT
    # warm-up on slotted responses of the training prompts (each slot [Token_i] or [Skip_i] with
    # probability 1/2, ``examples_per_prompt`` patterns per prompt), so that pi_0 writes the layout;
    # ``lr``/``epochs``/``batch_size`` override ``training``'s for this stage (LoRA as ``lora``, merged).
    "sft_warmup": None,
    "training": {
        "lr": 2.0e-3, "epochs": 1, "batch_size": 8, "grad_accum": 1, "eval_batch_size": 32, "max_length": 48,
        "max_prompt_length": 34, "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": 0, "device": "auto",
        "save_every": 4, "log_every": 4, "tensorboard": False,
    },
}
QUICK_OVERRIDES: dict = {  # the tiny random model: every step of the pipeline in seconds (tests)
    "model": "tiny",
    "data": {"num_train_prompts": 16, "num_eval_pairs": 8, "num_eval_prompts": 12},
    "sampling": {"max_new_tokens": 6, "batch_size": 32},
    "evaluation": {"max_new_tokens": 6, "samples_per_prompt": 2},
    "lora": {"r": 4, "alpha": 16},
    "training": {"lr": 1.0e-2, "batch_size": 4, "eval_batch_size": 16, "max_length": 40, "max_prompt_length": 30,
                 "warmup_ratio": 0.0, "device": "cpu", "save_every": 0, "log_every": 2, "progress_bar": False},
}
# Sections whose keys the trainer's config validates (any of its fields may be given).
OPEN_SECTIONS = ("lora", "training", "method", "methods", "adaptive_alpha", "sft_warmup")


# ----------------------------------------------------------------------------- settings

def merge_settings(defaults: dict, overrides: dict, path: str = "") -> dict:
    """``defaults`` updated by ``overrides`` recursively; unknown keys are refused by name
    (except inside the sections the trainer's config validates)."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        where = f"{path}.{key}".lstrip(".")
        if key not in merged and path not in OPEN_SECTIONS:
            raise ValueError(f"{where}: unknown setting (known: {', '.join(merged)})")
        if isinstance(merged.get(key), dict) and key != "methods" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a mapping, got {value!r}")
            merged[key] = merge_settings(merged[key], value, where)
        else:
            merged[key] = value
    if not path and merged.get("model") not in ("smollm2", "tiny"):
        raise ValueError(f"model: expected smollm2 or tiny, got {merged.get('model')!r}")
    return merged


def load_settings(defaults: dict, quick_overrides: dict, quick: bool, config: str | None) -> dict:
    """The demo's defaults, with ``--quick``'s overrides and then a YAML file's on top."""
    settings = merge_settings(defaults, quick_overrides) if quick else defaults
    return merge_settings(settings, read_overrides(config))


# ----------------------------------------------------------------------------- pi_0 and data

def source_model(settings: dict, out: Path) -> Path:
    """The model before the slot tokens: SmolLM2 (converted once, cached) or the tiny model."""
    if settings["model"] == "smollm2":
        return smollm2_path()
    from pyalign.demo.tiny_model import save_tiny_chat_model  # noqa: PLC0415

    folder = out / "tiny_model"
    if not (folder / "config.json").is_file():
        save_tiny_chat_model(folder)
    return folder


def prepare_base_model(source: Path, out: Path, num_dimensions: int) -> tuple[Path, list[int], list[int]]:
    """pi_0 = the source model plus ``[Token_i]`` and ``[Skip_i]`` (i = 1..K), saved once to
    ``out/base_model``. Returns the folder, the marker ids and the skip ids."""
    markers, skips = marker_tokens(num_dimensions)
    target = out / "base_model"
    if (target / "config.json").is_file():
        _, tokenizer = load_model_and_tokenizer(target)
        ids = tokenizer.convert_tokens_to_ids(markers + skips)
        if all(i is not None and i != tokenizer.unk_token_id for i in ids):
            return target, ids[:num_dimensions], ids[num_dimensions:]
    model, tokenizer = load_model_and_tokenizer(source)
    ids = add_marker_tokens(model, tokenizer, markers + skips)
    with atomic_directory(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target, ids[:num_dimensions], ids[num_dimensions:]


def sampled_texts(settings: dict, source: Path) -> dict:
    """The prompts of the experiment and one response text per training / held-out-pair prompt,
    sampled from the source model (cached): ``{train_prompts, train_texts, pair_prompts,
    pair_texts, eval_prompts}``."""
    data = settings["data"]
    train_prompts, eval_prompts = split_prompts(data["num_train_prompts"], data["num_eval_prompts"], data["seed"])
    if data["num_eval_pairs"] > len(eval_prompts):
        raise ValueError(f"data.num_eval_pairs: at most data.num_eval_prompts ({len(eval_prompts)}), "
                         f"got {data['num_eval_pairs']}")
    pair_prompts = eval_prompts[: data["num_eval_pairs"]]
    sampling = SamplingSettings(seed=data["seed"], system=SYSTEM_PROMPT, **settings["sampling"])
    model, tokenizer = load_model_and_tokenizer(source)
    texts = [r[0] for r in sample_responses(
        model, tokenizer, train_prompts + pair_prompts, sampling,
        model_id=model_fingerprint(source), cache_dir=models_cache_dir().parent / "demo_samples",
    )]
    del model
    return {"train_prompts": train_prompts, "train_texts": texts[: len(train_prompts)],
            "pair_prompts": pair_prompts, "pair_texts": texts[len(train_prompts):], "eval_prompts": eval_prompts}


def warmup_examples(prompts, texts, num_dimensions: int, examples_per_prompt: int, seed: int) -> list[dict]:
    """SFT records ``{prompt, response, system}``: each prompt's text behind ``examples_per_prompt``
    slot patterns, every slot ``[Token_i]`` or ``[Skip_i]`` with probability 1/2 (seeded)."""
    from pyalign.demo.spo_data import slot_response  # noqa: PLC0415
    import random  # noqa: PLC0415

    rng = random.Random(f"spo-warmup:{seed}")
    return [{"prompt": prompt, "response": slot_response(text, [rng.random() < 0.5 for _ in range(num_dimensions)]),
             "system": SYSTEM_PROMPT}
            for prompt, text in zip(prompts, texts) for _ in range(examples_per_prompt)]


def warmup_model(settings: dict, base_model: Path, source: Path, out: Path) -> Path:
    """pi_0 of the experiment: ``base_model`` itself, or (``sft_warmup`` set) ``base_model`` after
    an SFT pass on slotted responses of the training prompts (trained once, resumable)."""
    warmup = settings.get("sft_warmup")
    if not warmup:
        return base_model
    from pyalign.tasks.sft.run import run_sft  # noqa: PLC0415

    warmup = dict(warmup)
    per_prompt = int(warmup.pop("examples_per_prompt", 2))
    texts = sampled_texts(settings, source)
    records = warmup_examples(texts["train_prompts"], texts["train_texts"], settings["data"]["num_dimensions"],
                              per_prompt, settings["data"]["seed"])
    train = write_jsonl_atomic(out / "data" / "sft_warmup.jsonl", records)
    lora = dict(settings["lora"])
    result = run_sft({
        "task": "sft", "model": {"path": str(base_model), "dtype": "float32"}, "data": {"train": str(train)},
        "lora": lora, "training": {**settings["training"], **warmup}, "output_dir": str(out / "sft_warmup"),
    })
    return Path(result.model_dir)


def build_data(settings: dict, source: Path, out: Path) -> tuple[list[dict], list[str]]:
    """Sample one response per prompt from the source model and write, per dimension, its training
    pairs and its held-out pairs. Returns the trainer's ``rounds`` and the held-out prompts for
    generation."""
    data = settings["data"]
    k = data["num_dimensions"]
    sampled = sampled_texts(settings, source)
    train_prompts, train_texts = sampled["train_prompts"], sampled["train_texts"]
    pair_prompts, eval_texts, eval_prompts = sampled["pair_prompts"], sampled["pair_texts"], sampled["eval_prompts"]
    rounds = []
    for d in range(1, k + 1):
        common = {"num_dimensions": k, "other_prob": data["other_prob"], "system": SYSTEM_PROMPT}
        train = dimension_pairs(train_prompts, train_texts, d, conflict_rate=data["conflict_rate"], seed=data["seed"],
                                **common)
        held_out = dimension_pairs(pair_prompts, eval_texts, d, conflict_rate=0.0, seed=data["seed"] + 1, **common)
        rounds.append({
            "name": f"dim{d}",
            "train": str(write_jsonl_atomic(out / "data" / f"dim{d}.train.jsonl", train)),
            "eval": str(write_jsonl_atomic(out / "data" / f"dim{d}.eval.jsonl", held_out)),
        })
    return rounds, eval_prompts


def training_config(settings: dict, base_model: Path, token_ids, rounds, output_dir: Path, *, alpha,
                    adaptive: dict | None = None, reuse_from: Path | None = None,
                    cache_dir: Path | None = None) -> dict:
    """The trainer's config of one method (:mod:`pyalign.train.config`). The held-out pairs go to
    the trainer only when adaptive alpha measures them: the demos score every model themselves
    (:class:`pyalign.demo.evaluate.TeacherForced`), and the trainer would otherwise also cache
    every frozen model's log-probs on them and evaluate each round on them."""
    if not adaptive:
        rounds = [{key: value for key, value in r.items() if key != "eval"} for r in rounds]
    lora = dict(settings["lora"])
    if settings["train_token_rows"]:
        lora["trainable_token_indices"] = list(token_ids)
    config = {
        "model": {"path": str(base_model), "dtype": "float32"},
        "lora": lora,
        "method": {"loss": "spo", **settings["method"], "alpha": alpha, "adaptive_alpha": adaptive},
        "rounds": rounds,
        "training": settings["training"],
        "output_dir": str(output_dir),
    }
    if reuse_from is not None:
        config["reuse_rounds_from"] = str(reuse_from)
    if cache_dir is not None:
        config["cache_dir"] = str(cache_dir)
    return config


# ----------------------------------------------------------------------------- runs and evaluation

def run_method(config: dict, out: Path, name: str) -> list[Path]:
    """Train (or resume) one method; returns pi_1..pi_K's folders."""
    from pyalign.tasks.preference.rounds import run_sequential  # noqa: PLC0415

    write_json(out / f"train_config.{slug(name)}.json", config)
    result = run_sequential(config)
    return [Path(d) / "model" for d in result.round_dirs]


class Evaluator:
    """The teacher-forced metric and the generation metrics of any model of the experiment."""

    def __init__(self, settings: dict, base_model: Path, rounds: list[dict], eval_prompts: list[str],
                 marker_ids, skip_ids):
        training = settings["training"]
        self.teacher_forced = TeacherForced(
            base_model, [r["eval"] for r in rounds], beta=settings["method"]["beta"],
            max_length=training["max_length"], max_prompt_length=training["max_prompt_length"],
            batch_size=training.get("eval_batch_size") or training["batch_size"],
        )
        self.prompts = eval_prompts
        self.marker_ids, self.skip_ids = list(marker_ids), list(skip_ids)
        self.generation = EvalSettings(**settings["evaluation"])
        self._generated: dict[str, dict] = {}

    def __call__(self, model_dir: Path, label: str) -> dict:
        """``{"dimensions": [{dimension, accuracy, margin, presence, ...}], "pareto", "format",
        "empty", "first", "examples"}`` of one model (generation results reused for a folder already scored)."""
        key = str(Path(model_dir).resolve())
        if key not in self._generated:
            self._generated[key] = generation_metrics(
                model_dir, self.prompts, self.marker_ids, self.skip_ids, system=SYSTEM_PROMPT,
                settings=self.generation, label=label,
            )
        generated = self._generated[key]
        dimensions = [{**row, "presence": generated["presence"][row["dimension"] - 1]}
                      for row in self.teacher_forced(model_dir)]
        return {"dimensions": dimensions, "pareto": generated["pareto"], "format": generated["format"],
                "empty": generated["empty"], "first": generated["first"], "examples": generated["examples"]}


def slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in name)


def generation_row(result: dict) -> dict:
    """The generation columns of an :class:`Evaluator` result, as the demos' tables print them."""
    return {"presence": [d["presence"] for d in result["dimensions"]], "pareto": result["pareto"],
            "format": result["format"], "empty": result["empty"], "first": result["first"]}


def spo_offsets(cache_dir: Path, rounds: list[dict], alpha: float, beta: float) -> list[dict]:
    """Size of SPO's per-pair offset on each round's training pairs, from the run's cached frozen
    log-probs (``cache_dir``): ``offset = sum_k kappa_k * (Delta_k(y_w) - Delta_k(y_l))`` with
    ``Delta_k = log pi_k - log pi_{k-1}`` (k < n), split into the pairs that conflict with an
    earlier dimension and the others. A positive offset is a head start: the loss already counts
    that much margin, so the pair pushes less (on a conflicting pair: less unlearning)."""
    import json  # noqa: PLC0415

    from pyalign.demo.spo_data import conflicts_with_earlier  # noqa: PLC0415
    from pyalign.losses import spo_coefficients  # noqa: PLC0415

    num_dimensions = len(rounds)
    result = []
    for n in range(2, num_dimensions + 1):
        kappas = spo_coefficients([alpha] * (n - 1), beta)
        entries = []
        for i in range(n):
            file = Path(cache_dir) / f"model_{i}" / f"round_{n}_train.pt"  # pyalign.train.logprob_cache layout
            if not file.is_file():
                return result  # S-DPO rounds cache pi_{n-1} only
            entries.append(torch.load(file, map_location="cpu", weights_only=True))
        difference = [(e["chosen"].double() - e["rejected"].double()) for e in entries]  # log pi_i(y_w) - log pi_i(y_l)
        offset = sum(kappas[k - 1] * (difference[k] - difference[k - 1]) for k in range(1, n))
        with open(rounds[n - 1]["train"], encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        conflict = torch.tensor([conflicts_with_earlier(r, n, num_dimensions) for r in records])
        result.append({
            "round": n, "kappas": kappas, "pairs": len(records), "conflicting_pairs": int(conflict.sum()),
            "mean_offset_conflicting": float(offset[conflict].mean()) if conflict.any() else None,
            "mean_offset_others": float(offset[~conflict].mean()) if (~conflict).any() else None,
        })
    return result


def describe_offsets(offsets: dict) -> str:
    """One line of :func:`spo_offsets`' entry for a round: its kappas and the mean offset on the
    conflicting pairs and on the others (``-`` where a group is empty, e.g. conflict_rate 0)."""
    def mean(value):
        return "-" if value is None else f"{value:+.2f}"
    kappas = ", ".join(f"{k:+.4g}" for k in offsets["kappas"])
    others = offsets["pairs"] - offsets["conflicting_pairs"]
    return (f"round {offsets['round']} (kappas {kappas}): mean offset {mean(offsets['mean_offset_conflicting'])} "
            f"on the {offsets['conflicting_pairs']} conflicting pairs, {mean(offsets['mean_offset_others'])} "
            f"on the other {others}")
