"""Evaluation of the demonstrative experiment: which markers the trained models write.

A marker is *present* in a generation when its token id occurs among the generated tokens; a
generation is *Pareto-optimal* when every marker is present (the paper's Table 4, "Opt.").
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pyalign.generation import generate
from pyalign.io import write_json_atomic
from pyalign.models import load_model_and_tokenizer


@dataclass(frozen=True)
class EvalSettings:
    """How held-out generations are made. Sampling at temperature 1 reads the policy's own
    distribution (what DPO/SPO optimise); markers sit at the start of responses, so a few new
    tokens show them all."""

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


def evaluate_model(model_dir: str | os.PathLike, prompts: Sequence[str], marker_ids: Sequence[int], *,
                   system: str | None, settings: EvalSettings, dtype: str = "float32",
                   label: str | None = None, examples: int = 3) -> dict:
    """Generate on ``prompts`` with the model in ``model_dir`` and measure marker presence.
    Returns the presence dict plus a few decoded example generations."""
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype)
    generated = generate(
        model, tokenizer, prompts, system=system, n=settings.samples_per_prompt,
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, temperature=settings.temperature,
        seed=settings.seed, batch_size=settings.batch_size, progress=f"generating ({label})" if label else None,
        first_token_ids=marker_ids,
    )
    samples = [sample for row in generated for sample in row]
    repeated = [prompt for prompt, row in zip(prompts, generated) for _ in row]
    generations = [sample.token_ids for sample in samples]
    first_probs = torch.tensor([sample.first_token_probs for sample in samples])
    result = marker_presence(generations, marker_ids)
    # Mean probability of each marker as the response's first token: a continuous view of the
    # same thing (markers are trained at the start of responses).
    result["first_token_prob"] = first_probs.mean(0).tolist()
    result["examples"] = [
        {"prompt": prompt, "generation": tokenizer.decode(ids, skip_special_tokens=False)}
        for prompt, ids in list(zip(repeated, generations))[:examples]
    ]
    del model
    return result


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def table_markdown(final: Mapping[str, Mapping], markers: Sequence[str]) -> str:
    """Table 4 of the paper: one row per method, presence of each marker and the Pareto rate."""
    header = "| method | " + " | ".join(markers) + " | Opt. (all four) |"
    rule = "|---|" + "---|" * (len(markers) + 1)
    rows = [
        f"| {name} | " + " | ".join(_percent(p) for p in result["presence"]) + f" | {_percent(result['pareto'])} |"
        for name, result in final.items()
    ]
    return "\n".join([header, rule, *rows])


def rounds_markdown(per_round: Mapping[str, Sequence[Mapping]], markers: Sequence[str]) -> str:
    """Presence after every round, per method (how earlier markers survive later rounds); in
    parentheses the mean probability of the marker being the response's first token."""
    header = "| method | after round | " + " | ".join(markers) + " | Opt. |"
    rule = "|---|---|" + "---|" * (len(markers) + 1)
    rows = []
    for name, results in per_round.items():
        for round_number, result in enumerate(results, start=1):
            cells = " | ".join(f"{_percent(p)} ({q:.2f})"
                               for p, q in zip(result["presence"], result["first_token_prob"]))
            rows.append(f"| {name} | {round_number} | {cells} | {_percent(result['pareto'])} |")
    return "\n".join([header, rule, *rows])


def plot_table(path: str | os.PathLike, final: Mapping[str, Mapping], markers: Sequence[str], *,
               title: str, per_round: Mapping[str, Sequence[Mapping]] | None = None,
               reference: Mapping[str, Mapping] | None = None) -> Path:
    """Grouped bars of marker presence and Pareto rate per method (``reference``: extra rows
    drawn hatched, e.g. the paper's numbers); with ``per_round``, a second panel with each
    marker's presence after every round, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(markers) + ["Opt."]
    panels = 2 if per_round else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    bars = axes[0][0]
    rows = [(name, result, False) for name, result in final.items()]
    rows += [(name, result, True) for name, result in (reference or {}).items()]
    width = 0.8 / max(len(rows), 1)
    for m, (name, result, hatched) in enumerate(rows):
        values = [100 * p for p in result["presence"]] + [100 * result["pareto"]]
        xs = [i + (m - (len(rows) - 1) / 2) * width for i in range(len(labels))]
        style = {"hatch": "//", "alpha": 0.45, "color": f"C{m - len(final)}"} if hatched else {"color": f"C{m}"}
        drawn = bars.bar(xs, values, width, label=name, **style)
        bars.bar_label(drawn, fmt="%.0f", fontsize=6)
    bars.set_xticks(range(len(labels)), labels)
    bars.set_ylabel("% of held-out generations")
    bars.set_ylim(0, 105)
    bars.set_title("after the last round")
    bars.legend(fontsize=7)
    if per_round:
        lines = axes[0][1]
        styles = ["-", "--", ":", "-."]
        for m, (name, results) in enumerate(per_round.items()):
            rounds = range(1, len(results) + 1)
            for k, marker in enumerate(markers):
                lines.plot(rounds, [100 * r["presence"][k] for r in results], styles[m % len(styles)],
                           color=f"C{k}", marker="o", label=f"{name} {marker}")
        lines.set_xticks(list(range(1, max(len(r) for r in per_round.values()) + 1)))
        lines.set_xlabel("after round")
        lines.set_ylabel("% of held-out generations")
        lines.set_ylim(-3, 103)
        lines.set_title("presence of each marker, round by round")
        lines.legend(fontsize=6, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_json(path: str | os.PathLike, payload: Mapping) -> Path:
    return write_json_atomic(path, payload)
