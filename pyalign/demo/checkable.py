"""Checkable questions for the APO/CLAIR and reward-augmented demos (docs/experiments.md).

The questions are the DPA demo's (:mod:`pyalign.demo.dpa_tasks`: arithmetic, unit conversions,
capitals), split into training and held-out prompts. Because a program knows each answer, it
can also

- **revise** a wrong answer in place (:func:`revise_answer`, the CLAIR reviser that knows the
  answer): the number after the last ``=`` is replaced by the right one, a trailing ``=`` gets the
  answer, a named capital is replaced; otherwise one sentence with the answer is appended; all
  other text is kept;
- **write** a correct answer independently of the model (:func:`reference_answer`);
- **grade** an answer (:func:`grade`): correct and short (at most :data:`SHORT_WORDS` words) = 10,
  correct and longer = 7, wrong = 3 / 2 / 1 by how far off (a number not copied from the question
  within 10% / 50% of the answer: 3 / 2; another capital of the list named: 2; else 1).

Plus the statistics the demos report: Wilson intervals for accuracies, t-intervals for mean
scores, and the token edit distance of a pair.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from pyalign.demo.dpa_tasks import CAPITALS, KINDS, Task, is_correct, make_tasks, numbers_in

SYSTEM = "Answer the question."  # short: the template's default system prompt would double every prompt
SHORT_WORDS = 10
TOP_SCORE, LOW_SCORE, SCORE_RANGE = 10, 1, (1, 10)
_EQUALS_NUMBER = re.compile(r"=\s*(-?\d[\d,]*(?:\.\d+)?)")
_CAPITAL_OF = re.compile(r"capital of (.+?)\?\s*$")
_UNITS = re.compile(r"How many (\w+) are in (\d+) (\w+)\?")
_NAMED = re.compile(r"(capital of [^.,;\n]*? is )((?:[A-Z][\w'\u00C0-\u017F-]*)(?:\s+[A-Z][\w'\u00C0-\u017F-]*)*)")


def split_tasks(num_train: int, num_eval: int, *, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """``num_train`` training and ``num_eval`` held-out questions, disjoint, every kind in both
    (one bank of distinct questions, shuffled with ``seed``, cut in two)."""
    tasks = make_tasks(num_train + num_eval, seed=seed, kinds=KINDS)
    random.Random(f"checkable-split:{seed}").shuffle(tasks)
    return tasks[:num_train], tasks[num_train:]


def reference_answer(task: Task) -> str:
    """A short correct answer written without looking at any model's text."""
    if task.kind == "capitals":
        country = _CAPITAL_OF.search(task.prompt).group(1)
        return f"{task.answer} is the capital of {country}."
    if task.kind == "units":
        small, count, large = _UNITS.search(task.prompt).groups()
        return f"There are {task.answer} {small} in {count} {large}."
    return f"The answer is {task.answer}."


def revise_answer(task: Task, response: str) -> str:
    """The minimal edit of ``response`` that makes it correct (``response`` itself when it is
    correct already); see the module docstring."""
    if is_correct(task, response):
        return response
    text = response.rstrip()
    if task.kind == "capitals":
        named = list(_NAMED.finditer(text))
        if named:
            last = named[-1]
            return text[:last.start(2)] + task.answer + text[last.end(2):]
        country = _CAPITAL_OF.search(task.prompt).group(1)
        return _append(text, f"The capital of {country} is {task.answer}.")
    after_equals = list(_EQUALS_NUMBER.finditer(text))
    if after_equals:
        last = after_equals[-1]
        return text[:last.start(1)] + task.answer + text[last.end(1):]
    if text.endswith("="):
        return f"{text} {task.answer}"
    return _append(text, f"The answer is {task.answer}.")


def _append(text: str, sentence: str) -> str:
    return f"{text} {sentence}" if text else sentence


def _closeness(task: Task, response: str) -> int:
    """3 / 2 / 1 for a wrong answer: how far off the closest number (or whether another capital
    of the list is named)."""
    if task.kind == "capitals":
        others = [c for _, c, _ in CAPITALS if c != task.answer]
        named = any(re.search(r"\b" + re.escape(c) + r"\b", response, flags=re.IGNORECASE) for c in others)
        return 2 if named else 1
    given = set(numbers_in(task.prompt))  # numbers copied from the question are no answer
    numbers = [n for n in numbers_in(response) if n not in given]
    if not numbers:
        return 1
    target = float(task.answer)
    error = min(abs(n - target) for n in numbers) / abs(target)
    return 3 if error <= 0.1 else 2 if error <= 0.5 else 1


def grade(task: Task, response: str) -> int:
    """10 (correct, at most :data:`SHORT_WORDS` words), 7 (correct, longer), 3 / 2 / 1 (wrong)."""
    if is_correct(task, response):
        return TOP_SCORE if len(response.split()) <= SHORT_WORDS else 7
    return _closeness(task, response)


# ----------------------------------------------------------------------------- statistics

def wilson_interval(successes: int, total: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if total <= 0:
        return [float("nan"), float("nan")]
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def t_interval(values: Sequence[float]) -> list[float]:
    """95% t-interval of a mean (normal quantile past 30 values)."""
    n = len(values)
    if n < 2:
        return [float("nan"), float("nan")]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = 1.959964 if n > 30 else _T95[min(n - 1, len(_T95)) - 1]
    half = quantile * sd / math.sqrt(n)
    return [round(mean - half, 4), round(mean + half, 4)]


_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def token_edit_distance(tokenizer, chosen: str, rejected: str) -> int:
    """:func:`edit_distance` over the tokenizer's ids of the two texts."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (chosen, rejected)]
    return edit_distance(*ids)
