"""PNG figures of the SPO demos (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyalign.io import save_figure_atomic


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _finish(figure, title: str, path: str | os.PathLike) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def plot_table4(path: str | os.PathLike, per_round: Mapping[str, Sequence[Mapping]], num_dimensions: int, *,
                title: str, paper: Mapping[str, Mapping] | None = None) -> Path:
    """Left: final presence of each marker and the Pareto rate per method (the paper's numbers
    hatched). Right: the teacher-forced margin of each dimension after every round, per method."""
    plt = _pyplot()
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.4))
    labels = [f"[Token_{d}]" for d in range(1, num_dimensions + 1)] + ["Opt."]
    rows = [(name, [d["presence"] for d in results[-1]["dimensions"]] + [results[-1]["pareto"]], False)
            for name, results in per_round.items()]
    rows += [(f"paper {name}", list(r["presence"]) + [r["pareto"]], True) for name, r in (paper or {}).items()]
    width = 0.8 / max(len(rows), 1)
    for m, (name, values, hatched) in enumerate(rows):
        xs = [i + (m - (len(rows) - 1) / 2) * width for i in range(len(labels))]
        style = {"hatch": "//", "alpha": 0.45, "color": f"C{m - len(per_round)}"} if hatched else {"color": f"C{m}"}
        drawn = bars.bar(xs, [100 * v for v in values], width, label=name, **style)
        bars.bar_label(drawn, fmt="%.0f", fontsize=6)
    bars.set_xticks(range(len(labels)), labels)
    bars.set_ylabel("% of held-out generations")
    bars.set_ylim(0, 105)
    bars.set_title("generation after the last round")
    bars.legend(fontsize=7)
    styles = ["-", "--", ":", "-."]
    for m, (name, results) in enumerate(per_round.items()):
        rounds = range(1, len(results) + 1)
        for d in range(num_dimensions):
            lines.plot(rounds, [r["dimensions"][d]["margin"] for r in results], styles[m % len(styles)],
                       color=f"C{d}", marker="o", label=f"{name} dim {d + 1}")
    lines.axhline(0, color="grey", linewidth=0.6)
    lines.set_xticks(list(range(1, max(len(r) for r in per_round.values()) + 1)))
    lines.set_xlabel("after round")
    lines.set_ylabel("held-out margin beta*log(pi/pi_0), w - l")
    lines.set_title("teacher-forced margin of each dimension")
    lines.legend(fontsize=6, ncol=2)
    return _finish(figure, title, path)


def plot_alpha_sweep(path: str | os.PathLike, fixed: Sequence[tuple[float, Mapping]], *, title: str,
                     round1: Mapping | None = None, adaptive: Mapping | None = None,
                     trajectory: Sequence[Mapping] | None = None) -> Path:
    """Left: dimension 1's and 2's teacher-forced margins after round 2 against alpha (round 1's
    model as a dotted line; adaptive alpha as stars at the alpha it ended with). Right: adaptive
    alpha's trajectory (alpha and dimension 1's margin per update)."""
    plt = _pyplot()
    panels = 2 if trajectory else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), squeeze=False)
    left = axes[0][0]
    alphas = [a for a, _ in fixed]
    for d, color in ((0, "C0"), (1, "C1")):
        left.plot(alphas, [r["dimensions"][d]["margin"] for _, r in fixed], "-o", color=color,
                  label=f"dim {d + 1} after round 2")
        if round1 is not None:
            left.axhline(round1["dimensions"][d]["margin"], color=color, linestyle=":", linewidth=1,
                         label=f"dim {d + 1} after round 1")
        if adaptive is not None:
            left.plot([adaptive["alpha"]], [adaptive["dimensions"][d]["margin"]], "*", color=color, markersize=14,
                      label=f"dim {d + 1}, adaptive (ends at alpha {adaptive['alpha']:.2f})")
    left.set_xlabel("alpha (round 2)")
    left.set_ylabel("held-out margin beta*log(pi/pi_0), w - l")
    left.set_title("what round 2 keeps of dim 1 and learns of dim 2")
    left.legend(fontsize=7)
    if trajectory:
        right = axes[0][1]
        steps = [e["step"] for e in trajectory]
        right.plot(steps, [e["alphas"][0] for e in trajectory], "-o", color="C2", label="alpha_1")
        right.set_xlabel("round-2 step")
        right.set_ylabel("alpha_1")
        right.set_ylim(-0.03, 1.03)
        twin = right.twinx()
        twin.plot(steps, [e["margins"][0] for e in trajectory], "--s", color="C0", label="dim 1 margin (measured)")
        if adaptive is not None and "threshold" in adaptive:
            twin.axhline(adaptive["threshold"], color="C0", linestyle=":", label="threshold H_1")
        twin.set_ylabel("dim 1 held-out margin")
        handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        right.legend(handles, [h.get_label() for h in handles], fontsize=7)
        right.set_title("adaptive alpha: dual ascent during round 2")
    return _finish(figure, title, path)
