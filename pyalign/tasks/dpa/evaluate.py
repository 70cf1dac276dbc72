"""The empirical front of a DPA policy and the arithmetic-control check (docs/dpa.md, "Evaluation").

For each evaluation direction v the policy answers the held-out prompts with v in its system
prompt; the front point of v is the mean, over those samples, of each objective's reward (by the
reward model, and by the task's true objectives when it has them, both on the reward model's
0-100 scale). Across iterations:

- ``J_t(v) = v . mean r`` is what iteration t maximises for v; iteration t *dominates* t-1 on the
  front when ``J_t(v) >= J_{t-1}(v)`` for every evaluation direction;
- arithmetic control: the Spearman rank correlation, over the directions, between the weight v
  gives the controlled objective (e.g. verbosity's ``v[1]``) and that objective's mean: close to
  +1 when turning v moves the objective as asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from pyalign import distributed
from pyalign.data import file_fingerprint
from pyalign.directions import angle_of, direction_system_prompt, evaluation_directions, unit_direction, weighted_reward
from pyalign.io import read_json, save_figure_atomic, write_json_atomic


def eval_directions(config) -> list[tuple[float, ...]]:
    """The configured evaluation directions (explicit vectors, or evenly spaced angles)."""
    evaluation = config.evaluation
    if evaluation.vectors is not None:
        return [unit_direction(v, len(config.objectives), name=f"evaluation.vectors[{i}]")
                for i, v in enumerate(evaluation.vectors)]
    return evaluation_directions(evaluation.directions, angle_range=evaluation.angle_range)


def front_point(v: Sequence[float], objectives: Sequence[str], reward_model_scores: Sequence[Sequence[float]],
                true_scores: Sequence[Sequence[float]] | None) -> dict:
    """One direction's point: mean scores per objective (reward model, true), ``angle`` (2-D)."""
    point = {"v": [float(x) for x in v], "angle": angle_of(v) if len(v) == 2 else None,
             "num_samples": len(reward_model_scores)}
    for key, scores in (("reward_model", reward_model_scores), ("true", true_scores)):
        if scores is None:
            continue
        means = torch.tensor(scores, dtype=torch.float64).mean(0).tolist()
        point[key] = dict(zip(objectives, means))
        point[f"weighted_{key}"] = weighted_reward(v, means)
    return point


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson r of the average ranks); NaN when either is constant."""
    from pyalign.reward_model.metrics import pearson  # noqa: PLC0415

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x, y: expected two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    return pearson(torch.tensor(ranks(x)), torch.tensor(ranks(y)))


def permutation_p_value(x: Sequence[float], y: Sequence[float], rho: float, *, permutations: int = 10_000,
                        seed: int = 0) -> float:
    """Two-sided p-value of Spearman's ``rho`` under independence: the share of seeded random
    pairings of ``x`` with ``y`` whose |rho| reaches ``|rho|`` (with 10 directions, |rho| >= 0.65
    is needed for p < 0.05)."""
    import random  # noqa: PLC0415

    rank_x, rank_y = torch.tensor(ranks(x), dtype=torch.float64), ranks(y)
    rank_x = rank_x - rank_x.mean()
    rng = random.Random(seed)
    shuffled = torch.tensor([rng.sample(rank_y, len(rank_y)) for _ in range(permutations)], dtype=torch.float64)
    shuffled = shuffled - shuffled.mean(1, keepdim=True)
    r = (shuffled @ rank_x) / (shuffled.norm(dim=1) * rank_x.norm()).clamp(min=1e-300)
    return float(((r.abs() >= abs(rho) - 1e-12).sum() + 1) / (permutations + 1))


def control_check(front: Sequence[dict], objectives: Sequence[str], objective: str) -> dict:
    """``{"objective", "spearman", "p_value", "source", "weights", "means"}`` for one iteration's
    front: the rank correlation of ``v[objective]`` with the objective's mean (true values when
    the front has them, else the reward model's) and its permutation p-value."""
    k = list(objectives).index(objective)
    source = "true" if all("true" in p for p in front) else "reward_model"
    weights = [p["v"][k] for p in front]
    means = [p[source][objective] for p in front]
    rho = spearman(weights, means)
    defined = not math.isnan(rho)
    return {"objective": objective, "spearman": rho if defined else None,
            "p_value": permutation_p_value(weights, means, rho) if defined else None, "source": source,
            "weights": weights, "means": means}


def dominance(previous: Sequence[dict], current: Sequence[dict], source: str) -> dict:
    """Per direction, ``J_t(v) - J_{t-1}(v)`` by ``source`` (reward_model or true); ``dominates``
    when no direction got worse."""
    key = f"weighted_{source}"
    gains = [c[key] - p[key] for p, c in zip(previous, current)]
    return {"source": source, "gains": gains, "dominates": all(g >= 0 for g in gains),
            "improved": sum(g > 0 for g in gains), "directions": len(gains)}


def front_table(front: Sequence[dict], objectives: Sequence[str]) -> str:
    """Markdown: one row per direction with its weights, reward-model and true means."""
    has_true = all("true" in p for p in front)
    header = ["v", "angle"] + [f"RM {o}" for o in objectives] + ([f"true {o}" for o in objectives] if has_true else [])
    header += ["J (RM)"] + (["J (true)"] if has_true else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in front:
        cells = ["(" + ", ".join(f"{x:.2f}" for x in p["v"]) + ")",
                 "" if p["angle"] is None else f"{p['angle']:.3f}"]
        cells += [f"{p['reward_model'][o]:.1f}" for o in objectives]
        if has_true:
            cells += [f"{p['true'][o]:.1f}" for o in objectives]
        cells += [f"{p['weighted_reward_model']:.1f}"] + ([f"{p['weighted_true']:.1f}"] if has_true else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fronts(path: str | Path, iterations: Sequence[dict], objectives: Sequence[str], *, title: str = "") -> Path:
    """A PNG of the fronts, one curve per iteration: x = the second objective, y = the first;
    one panel for the reward model's scores, one for the true objectives when there are any."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sources = ["reward_model"] + (["true"] if all("true" in p for it in iterations for p in it["front"]) else [])
    x_name, y_name = objectives[1], objectives[0]
    figure, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.5), squeeze=False)
    colors = plt.cm.viridis([i / max(len(iterations) - 1, 1) for i in range(len(iterations))])
    for axis, source in zip(axes[0], sources):
        for color, iteration in zip(colors, iterations):
            xs = [p[source][x_name] for p in iteration["front"]]
            ys = [p[source][y_name] for p in iteration["front"]]
            axis.plot(xs, ys, "o-", color=color, label=f"iteration {iteration['iteration']}", markersize=4)
            axis.annotate("v=<1,0>", (xs[0], ys[0]), fontsize=7, color=color, alpha=0.8)
        axis.set_xlabel(f"{x_name} (0-100)")
        axis.set_ylabel(f"{y_name} (0-100)")
        axis.set_title("by the reward model" if source == "reward_model" else "by the true objectives")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure_atomic(figure, path)


# ----------------------------------------------------------------------------- the evaluation stage

def evaluate_policy(run, t: int) -> dict:
    """The front of pi_t on the held-out prompts of a :class:`pyalign.tasks.dpa.loop.DPARun` (cached
    in its ``evaluation/iteration_<t>/front.json``, resumable like the loop's stages)."""
    config, directory = run.config, run.eval_dir(t)
    directions = eval_directions(config)
    settings = run.generation_settings(evaluation=True)
    key = {"policy": run.model_fingerprint(t), "reward_model": run.reward_model_fingerprint(),
           "prompts": file_fingerprint(config.prompts.eval), "objectives": config.objectives,
           "directions": [list(v) for v in directions], "system_prefix": config.directions.system_prefix,
           "settings": settings, "true_ratings": config.evaluation.true_ratings}
    if config.directions.prompt_style != "paper":  # keyed only when set: older runs' keys stay valid
        key["prompt_style"] = config.directions.prompt_style
    front_file = directory / "front.json"
    if front_file.is_file() and read_json(front_file)["key"] == json.loads(json.dumps(key)):
        return read_json(front_file)
    run.check_plan(directory / "plan.json", key, f"the evaluation of iteration {t}")
    rows = [{"prompt": record["prompt"], "v": list(v), "prompt_index": i, "direction_index": d,
             "system": direction_system_prompt(v, config.objectives, prefix=config.directions.system_prefix,
                                               style=config.directions.prompt_style)}
            for i, record in enumerate(run.eval_rows) for d, v in enumerate(directions)]
    info = {"stage": "evaluation", "iteration": t}
    generated = run.generate(directory / "samples.jsonl", t, rows, settings, info)
    scored = run.score(directory / "scored.jsonl", rows, generated, info, prompt_records=run.eval_rows)
    front = []
    for d, v in enumerate(directions):
        samples = [s for row, plan in zip(scored, rows) if plan["direction_index"] == d for s in row["samples"]]
        true = [s["true"] for s in samples] if run.true_ratings is not None else None
        front.append(front_point(v, config.objectives, [s["scores"] for s in samples], true))
    result = {"key": key, "iteration": t, "model": str(run.model_dirs[t]), "front": front}
    if distributed.is_main():
        write_json_atomic(front_file, result, checksum=True)
    distributed.barrier()
    run.callback("evaluated", {"iteration": t})
    return result


def write_fronts(run, evaluations: list[dict]) -> tuple[dict, Path, Path]:
    """fronts.json (every iteration's front, the control check, dominance) and fronts.png."""
    objectives = run.config.objectives
    control_objective = run.config.evaluation.control_objective or objectives[-1]
    iterations = [{"iteration": e["iteration"], "model": e["model"], "front": e["front"],
                   "control": control_check(e["front"], objectives, control_objective)} for e in evaluations]
    sources = ["reward_model"] + (["true"] if run.true_ratings is not None else [])
    dominances = [{"iteration": b["iteration"], "previous": a["iteration"],
                   **{s: dominance(a["front"], b["front"], s) for s in sources}}
                  for a, b in zip(iterations, iterations[1:])]
    fronts = {"objectives": objectives, "iterations": iterations, "control": iterations[-1]["control"],
              "dominance": dominances}
    json_file = run.output_dir / "fronts.json"
    png = run.output_dir / "fronts.png"
    if distributed.is_main():
        write_json_atomic(json_file, fronts)
        plot_fronts(png, iterations, objectives,
                    title=f"DPA empirical fronts ({len(run.eval_rows)} held-out prompts)")
    distributed.barrier()
    return fronts, json_file, png
