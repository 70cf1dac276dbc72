"""PNG chart of a benchmark run: one panel per (shape, dtype) case, one bar per method (median
ms, the inter-quartile range as an error bar), the floor as a dashed line."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_cases(cases: Sequence[dict], path: Path, title: str) -> None:
    """``cases``: dicts with ``label``, ``floor_ms`` and ``methods`` (dicts with ``method``,
    ``median_ms``, ``q1_ms``, ``q3_ms``; methods without a median were skipped and are left out)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cases = [c for c in cases if any(m.get("median_ms") is not None for m in c["methods"])]
    if not cases:
        raise ValueError("cases: nothing was timed, no chart to draw")
    columns = min(3, len(cases))
    rows = (len(cases) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 0.9 + 0.42 * _most_methods(cases) * rows),
                             squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes.flat, cases):
        timed = [m for m in case["methods"] if m.get("median_ms") is not None]
        names = [m["method"] for m in timed]
        medians = [m["median_ms"] for m in timed]
        low = [m["median_ms"] - m.get("q1_ms", m["median_ms"]) for m in timed]
        high = [m.get("q3_ms", m["median_ms"]) - m["median_ms"] for m in timed]
        colours = ["tab:blue" if n.startswith("pyalign") else "tab:gray" for n in names]
        positions = range(len(timed))
        ax.barh(positions, medians, xerr=[low, high], color=colours, capsize=2)
        ax.set_yticks(list(positions), names, fontsize=8)
        ax.invert_yaxis()
        panel_title = case["label"]
        if case.get("floor_ms"):
            ax.axvline(case["floor_ms"], color="tab:red", linestyle="--", linewidth=1)
            panel_title += f" (red: floor {case['floor_ms']:.3g} ms)"
        if max(medians) > 20 * min(medians):
            ax.set_xscale("log")  # the float64 reference or a row loop would squash the rest
        for y, value in zip(positions, medians):
            ax.text(value, y, f" {value:.3g}", va="center", fontsize=7)
        ax.set_xlabel("median ms, forward + backward (bars: inter-quartile range)")
        ax.set_title(panel_title, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _most_methods(cases: Sequence[dict]) -> int:
    return max(len(c["methods"]) for c in cases)
