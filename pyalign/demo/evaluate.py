"""Evaluation of the SPO demos: a teacher-forced metric and the markers models generate.

**Teacher-forced** (forward passes only; smooth, so small differences are measurable): for a
model pi and the held-out pairs of dimension d,

    margin_d(pi)   = mean over pairs of beta * [log pi(y_w)/pi_0(y_w) - log pi(y_l)/pi_0(y_l)]
    accuracy_d(pi) = share of pairs where that implicit-reward difference is > 0

(pi_0 itself has margin 0 and accuracy 0 by definition). Log-probs come from the trainer's own
function (:func:`pyalign.train.logprob_cache.dataset_logprobs`) and the metrics from
:func:`pyalign.tasks.preference.evaluate.preference_metrics`; a model's log-probs are computed once per
process, keyed by its weights' fingerprint (runs that share a round share them).

**Generation** (the paper's Table 4): a marker is *present* in a generation when its token id
occurs among the generated tokens; a generation is *Pareto-optimal* when every marker is present;
*format* is the share of generations whose first K tokens are the K slots in order
(``[Token_i]`` or ``[Skip_i]`` in slot i), i.e. how well the model writes the response layout;
*empty* is the share that ends at once (the stop token comes first: no token, no marker), which
tells a model that stopped writing from one that writes without markers. *first* is the mean
probability (raw logits, no temperature) of the first generated token being ``[Token_1]``,
``[Skip_1]`` or the end of the turn: slot 1 comes first, so this shows where dimension 1's mass
goes when a model stops writing ``[Token_1]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pyalign.data import PreferenceDataset
from pyalign.generation import generate
from pyalign.io import write_json_atomic
from pyalign.models import load_model_and_tokenizer
from pyalign.tasks.preference.evaluate import preference_metrics
from pyalign.train.logprob_cache import dataset_logprobs
from pyalign.models import load_model, load_tokenizer, model_fingerprint


# ----------------------------------------------------------------------------- teacher-forced

class TeacherForced:
    """Per-dimension preference accuracy and mean implicit-reward margin vs ``base_dir`` (pi_0)
    on the held-out pairs ``eval_files`` (one JSONL file per dimension, in order)."""

    def __init__(self, base_dir: str | os.PathLike, eval_files: Sequence[str | os.PathLike], *, beta: float,
                 max_length: int, max_prompt_length: int, batch_size: int = 32, device: str = "cpu",
                 dtype: str = "float32"):
        if not eval_files:
            raise ValueError("eval_files: expected one held-out pair file per dimension, got none")
        tokenizer = load_tokenizer(base_dir)
        self.datasets = [PreferenceDataset.from_jsonl(f, tokenizer, max_length, max_prompt_length) for f in eval_files]
        self.beta, self.batch_size, self.device, self.dtype = beta, batch_size, torch.device(device), dtype
        self._memo: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.base = self.logprobs(base_dir)

    def logprobs(self, model_dir: str | os.PathLike) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(chosen, rejected) sequence log-probs of the model on every dimension's pairs."""
        key = model_fingerprint(model_dir)
        if key not in self._memo:
            model = load_model(model_dir, self.dtype, self.device)
            self._memo[key] = [
                dataset_logprobs(model, data, batch_size=self.batch_size, device=self.device,
                                 mixed_precision="no", average=False)
                for data in self.datasets
            ]
            del model
        return self._memo[key]

    def __call__(self, model_dir: str | os.PathLike) -> list[dict]:
        """``[{"dimension": d (1-based), "accuracy", "margin", "chosen_reward", "rejected_reward",
        "pairs"}, ...]`` for the model in ``model_dir``."""
        rows = []
        for d, (policy, reference) in enumerate(zip(self.logprobs(model_dir), self.base), start=1):
            metrics = preference_metrics(*policy, *reference, beta=self.beta)
            rows.append({"dimension": d, "accuracy": metrics["reward_accuracy"], "margin": metrics["reward_margin"],
                         "chosen_reward": metrics["chosen_reward"], "rejected_reward": metrics["rejected_reward"],
                         "pairs": metrics["pairs"]})
        return rows


# ----------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class EvalSettings:
    """How held-out generations are made. Sampling at temperature 1 reads the policy's own
    distribution (what DPO/SPO optimise); the slots come first, so a few new tokens show them."""

    max_new_tokens: int = 8
    do_sample: bool = True
    temperature: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 1234
    batch_size: int = 64


def marker_presence(generations: Sequence[Sequence[int]], marker_ids: Sequence[int]) -> dict:
    """Fraction of generations containing each marker, and containing all of them (``pareto``)."""
    if not generations:
        raise ValueError("generations must not be empty")
    present = [[marker in set(ids) for marker in marker_ids] for ids in generations]
    count = len(generations)
    return {
        "presence": [sum(row[k] for row in present) / count for k in range(len(marker_ids))],
        "pareto": sum(all(row) for row in present) / count,
        "num_generations": count,
    }


def slot_format_rate(generations: Sequence[Sequence[int]], marker_ids: Sequence[int], skip_ids: Sequence[int]) -> float:
    """Share of generations whose first K tokens are the K slots in order (``marker_ids[i]`` or
    ``skip_ids[i]`` at position i)."""
    if not generations:
        raise ValueError("generations must not be empty")
    if len(marker_ids) != len(skip_ids):
        raise ValueError(f"skip_ids: expected one per marker ({len(marker_ids)}), got {len(skip_ids)}")
    slots = list(zip(marker_ids, skip_ids))
    ok = sum(len(ids) >= len(slots) and all(ids[i] in slot for i, slot in enumerate(slots)) for ids in generations)
    return ok / len(generations)


def generation_metrics(model_dir: str | os.PathLike, prompts: Sequence[str], marker_ids: Sequence[int],
                       skip_ids: Sequence[int], *, system: str | None, settings: EvalSettings,
                       dtype: str = "float32", label: str | None = None, examples: int = 3) -> dict:
    """Generate on ``prompts`` with the model in ``model_dir``: marker presence, Pareto rate,
    slot-format rate, share of empty generations, first-token probabilities (``first``:
    ``{"Token_1", "Skip_1", "end"}``) and a few decoded examples."""
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype)
    first = {"Token_1": marker_ids[0], "Skip_1": skip_ids[0], "end": tokenizer.eos_token_id}
    first = {name: i for name, i in first.items() if i is not None}
    generated = generate(
        model, tokenizer, prompts, system=system, n=settings.samples_per_prompt,
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, temperature=settings.temperature,
        seed=settings.seed, batch_size=settings.batch_size, progress=f"generating ({label})" if label else None,
        first_token_ids=list(first.values()),
    )
    del model
    repeated = [prompt for prompt, row in zip(prompts, generated) for _ in row]
    generations = [sample.token_ids for row in generated for sample in row]
    result = marker_presence(generations, marker_ids)
    result["format"] = slot_format_rate(generations, marker_ids, skip_ids)
    result["empty"] = sum(not ids for ids in generations) / len(generations)
    samples = [sample for row in generated for sample in row]
    result["first"] = {name: sum(s.first_token_probs[j] for s in samples) / len(samples)
                       for j, name in enumerate(first)}
    result["examples"] = [
        {"prompt": prompt, "generation": tokenizer.decode(ids, skip_special_tokens=False)}
        for prompt, ids in list(zip(repeated, generations))[:examples]
    ]
    return result


# ----------------------------------------------------------------------------- tables

def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def presence_table(rows: Mapping[str, Mapping], num_dimensions: int) -> str:
    """Markdown: one row per model label, presence of each marker, Pareto rate, format rate,
    share of empty generations and the first token's probabilities (``[Token_1]`` / ``[Skip_1]`` /
    end of turn)."""
    header = ("| model | " + " | ".join(f"[Token_{d}]" for d in range(1, num_dimensions + 1))
              + " | Opt. (all) | slot format | empty | p(first): [Token_1] / [Skip_1] / end |")
    rule = "|---|" + "---|" * (num_dimensions + 4)
    lines = [header, rule]
    for label, result in rows.items():
        cells = " | ".join(_percent(p) for p in result["presence"])
        first = " / ".join(f"{result['first'][name]:.2f}" if name in result["first"] else "-"
                           for name in ("Token_1", "Skip_1", "end"))
        lines.append(f"| {label} | {cells} | {_percent(result['pareto'])} | {_percent(result['format'])} | "
                     f"{_percent(result['empty'])} | {first} |")
    return "\n".join(lines)


def metric_table(rows: Mapping[str, Sequence[Mapping]], num_dimensions: int) -> str:
    """Markdown: one row per model label, ``margin (accuracy)`` on each dimension."""
    header = "| model | " + " | ".join(f"dim {d} margin (acc.)" for d in range(1, num_dimensions + 1)) + " |"
    rule = "|---|" + "---|" * num_dimensions
    lines = [header, rule]
    for label, dims in rows.items():
        cells = " | ".join(f"{row['margin']:+.2f} ({_percent(row['accuracy'])})" for row in dims)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Mapping) -> Path:
    return write_json_atomic(path, payload)
