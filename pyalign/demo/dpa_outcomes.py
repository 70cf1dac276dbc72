"""What each iteration of the DPA demo achieved on the held-out evaluation, with intervals: the
true helpfulness rate (a count of correct answers: Wilson interval) and its change from pi_0, and
how far the mean true verbosity of the directions with ``v_2 > 0`` lies above that of the
directions with ``v_2 < 0`` (control as one number; both changes with a bootstrap over prompts,
paired: the same prompts are resampled for both iterations).

Reads ``dpa/evaluation/iteration_<t>/scored.jsonl``, whose samples carry ``true`` = the true
objectives on 0-100 in the order (helpfulness, verbosity) (docs/dpa.md, "The demo").
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

from pyalign.demo.checkable import wilson_interval
from pyalign.io import read_jsonl_rows

BOOTSTRAP_DRAWS = 2000


def _answers_by_prompt(scored_file: Path) -> dict[str, list[tuple[float, float, float]]]:
    """prompt -> [(v_2, true helpfulness, true verbosity)] over its directions and samples."""
    answers: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for row in read_jsonl_rows(scored_file):
        for sample in row["samples"]:
            if sample.get("true") is None:
                raise ValueError(f"{scored_file}: a sample without true ratings (evaluation.true_ratings unset?)")
            answers[row["prompt"]].append((row["v"][1], sample["true"][0], sample["true"][1]))
    return answers


def _helpfulness(answers, prompts) -> float:
    values = [h for p in prompts for _, h, _ in answers[p]]
    return sum(values) / len(values)


def _verbosity_gap(answers, prompts) -> float:
    longer = [v for p in prompts for w, _, v in answers[p] if w > 0]
    shorter = [v for p in prompts for w, _, v in answers[p] if w < 0]
    if not longer or not shorter:
        return float("nan")
    return sum(longer) / len(longer) - sum(shorter) / len(shorter)


def _interval(values: list[float]) -> list[float] | None:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return None
    return [round(values[int(0.025 * (len(values) - 1))], 2), round(values[int(0.975 * (len(values) - 1))], 2)]


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)


def iteration_outcomes(dpa_dir: Path, iterations: list[int], seed: int = 0) -> dict[str, dict]:
    """``{"iteration_<t>": {helpfulness, helpfulness_interval, answers, helpfulness_change_from_pi0,
    helpfulness_change_interval, verbosity_gap, verbosity_gap_interval}}`` for every t in
    ``iterations`` (0 = pi_0). Helpfulness in percent, verbosity on 0-100."""
    answers = {t: _answers_by_prompt(Path(dpa_dir) / "evaluation" / f"iteration_{t}" / "scored.jsonl")
               for t in iterations}
    base = answers[iterations[0]] if iterations[0] == 0 else None
    prompts = sorted(answers[iterations[0]])
    rng = random.Random(seed)
    draws = [[rng.choice(prompts) for _ in prompts] for _ in range(BOOTSTRAP_DRAWS)]
    outcomes = {}
    for t in iterations:
        mine = answers[t]
        if sorted(mine) != prompts:
            raise ValueError(f"iteration {t}: evaluated on other prompts than iteration {iterations[0]}")
        count = sum(len(mine[p]) for p in prompts)
        correct = sum(1 for p in prompts for _, h, _ in mine[p] if h > 0)
        result = {
            "answers": count,
            "helpfulness": round(100.0 * correct / count, 2),
            "helpfulness_interval": [round(100.0 * x, 2) for x in wilson_interval(correct, count)],
            # None when the directions do not have both signs (the paper's range)
            "verbosity_gap": _rounded(_verbosity_gap(mine, prompts)),
            "verbosity_gap_interval": _interval([_verbosity_gap(mine, d) for d in draws]),
        }
        if base is not None and t != 0:
            result["helpfulness_change_from_pi0"] = round(_helpfulness(mine, prompts) - _helpfulness(base, prompts), 2)
            result["helpfulness_change_interval"] = _interval(
                [_helpfulness(mine, d) - _helpfulness(base, d) for d in draws])
        outcomes[f"iteration_{t}"] = result
    return outcomes
