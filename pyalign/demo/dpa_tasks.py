"""Questions with short answers a program can check: the task bank of the DPA demo.

Three kinds, generated deterministically from a seed:

- ``arithmetic``: ``What is 7 + 5?``, ``What is 9 - 4?``, ``What is 6 times 3?`` (small operands,
  the answer never equals an operand, so echoing the question is not an answer);
- ``units``: ``How many minutes are in 3 hours?`` (factor x count, count >= 2);
- ``capitals``: ``What is the capital of Japan?`` (a fixed list of well-known countries).

The true objectives of a response (docs/dpa.md, "The demo"):

- ``helpfulness`` = 1 when the response contains the correct answer, else 0. A number counts when
  one of the numbers written in the response equals it (``1,000`` and ``1000.0`` read as 1000);
  a capital counts when its name (or an accepted alias) appears as whole words, any case;
- ``verbosity`` = the response's length in tokens of the policy's tokenizer.

The reward model rescales both to 0-100 (helpfulness over [0, 1], verbosity over
[0, max_new_tokens]).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

KINDS = ("arithmetic", "units", "capitals")

# (country, capital, other accepted spellings)
CAPITALS = (
    ("France", "Paris", ()), ("Japan", "Tokyo", ()), ("Italy", "Rome", ()), ("Germany", "Berlin", ()),
    ("Spain", "Madrid", ()), ("England", "London", ()), ("Russia", "Moscow", ()), ("China", "Beijing", ("Peking",)),
    ("Egypt", "Cairo", ()), ("Greece", "Athens", ()), ("Canada", "Ottawa", ()), ("Australia", "Canberra", ()),
    ("Portugal", "Lisbon", ()), ("Ireland", "Dublin", ()), ("Austria", "Vienna", ("Wien",)),
    ("Norway", "Oslo", ()), ("Sweden", "Stockholm", ()), ("Finland", "Helsinki", ()), ("Denmark", "Copenhagen", ()),
    ("Poland", "Warsaw", ()), ("Hungary", "Budapest", ()), ("Thailand", "Bangkok", ()), ("Kenya", "Nairobi", ()),
    ("Argentina", "Buenos Aires", ()), ("Peru", "Lima", ()), ("Chile", "Santiago", ()), ("Mexico", "Mexico City", ()),
    ("India", "New Delhi", ("Delhi",)), ("South Korea", "Seoul", ()), ("Turkey", "Ankara", ()),
    ("Iran", "Tehran", ()), ("Cuba", "Havana", ()), ("Belgium", "Brussels", ()), ("Netherlands", "Amsterdam", ()),
    ("Switzerland", "Bern", ("Berne",)), ("the United States", "Washington", ()), ("Brazil", "Brasilia", ("Brasília",)),
    ("Indonesia", "Jakarta", ()), ("Vietnam", "Hanoi", ()), ("Philippines", "Manila", ()),
    ("Colombia", "Bogota", ("Bogotá",)), ("Scotland", "Edinburgh", ()), ("Iceland", "Reykjavik", ("Reykjavík",)),
    ("Czech Republic", "Prague", ()), ("Morocco", "Rabat", ()), ("Nigeria", "Abuja", ()),
)
# (larger unit, smaller unit, factor)
UNITS = (
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("weeks", "days", 7),
    ("days", "hours", 24), ("years", "months", 12), ("feet", "inches", 12), ("liters", "milliliters", 1000),
    ("dozens", "items", 12), ("centuries", "years", 100),
)
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


@dataclass(frozen=True)
class Task:
    """One question and what counts as its answer."""

    prompt: str
    answer: str
    kind: str
    aliases: tuple[str, ...] = ()

    def to_record(self) -> dict:
        record = asdict(self)
        record["aliases"] = list(self.aliases)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Task":
        """A task from a prompt-file row; a missing or wrong field is a ValueError naming it."""
        for name in ("prompt", "answer", "kind"):
            if not isinstance(record.get(name), str):
                raise ValueError(f"{name}: a task row needs a string {name!r}, got {record.get(name)!r} "
                                 f"in {record!r}")
        if record["kind"] not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {record['kind']!r}")
        return cls(record["prompt"], record["answer"], record["kind"], tuple(record.get("aliases", ())))


def _arithmetic(rng: random.Random) -> Task:
    while True:
        op = rng.choice(("+", "-", "times"))
        if op == "times":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            answer = a * b
        else:
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            if op == "-":
                a, b = max(a, b), min(a, b)
            answer = a + b if op == "+" else a - b
        if answer not in (a, b) and answer > 0:
            return Task(f"What is {a} {op} {b}?", str(answer), "arithmetic")


def _units(rng: random.Random) -> Task:
    large, small, factor = rng.choice(UNITS)
    count = rng.randint(2, 9)
    return Task(f"How many {small} are in {count} {large}?", str(count * factor), "units")


def _capitals(rng: random.Random) -> Task:
    country, capital, aliases = rng.choice(CAPITALS)
    return Task(f"What is the capital of {country}?", capital, "capitals", tuple(aliases))


_MAKERS: dict[str, Callable[[random.Random], Task]] = {"arithmetic": _arithmetic, "units": _units, "capitals": _capitals}


def _arithmetic_count() -> int:
    plus = 19 * 19
    minus = sum(1 for a in range(2, 21) for b in range(2, 21) if a > b and a - b != b)
    return plus + minus + 8 * 8


def kind_sizes() -> dict[str, int]:
    """How many distinct questions the bank can make of each kind."""
    return {"arithmetic": _arithmetic_count(), "units": len(UNITS) * 8, "capitals": len(CAPITALS)}


def make_tasks(count: int, *, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Task]:
    """``count`` distinct questions, the kinds in turn (arithmetic, units, capitals, arithmetic,
    ...) while a kind has unused questions; the same seed gives the same list."""
    kinds = list(kinds)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds: expected distinct kinds among {', '.join(KINDS)}, got {kinds!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a positive integer, got {count!r}")
    limit = kind_sizes()
    rng = random.Random(f"dpa-tasks:{seed}")
    tasks: list[Task] = []
    seen: set[str] = set()
    used = dict.fromkeys(kinds, 0)
    turn = 0
    while len(tasks) < count:
        open_kinds = [k for k in kinds if used[k] < limit[k]]
        if not open_kinds:
            raise ValueError(f"count: the bank has {sum(limit[k] for k in kinds)} distinct questions "
                             f"of kinds {kinds}, asked for {count}")
        kind = open_kinds[turn % len(open_kinds)]
        task = _MAKERS[kind](rng)
        if task.prompt in seen:
            continue
        seen.add(task.prompt)
        used[kind] += 1
        tasks.append(task)
        turn += 1
    return tasks


def numbers_in(text: str) -> list[float]:
    """The numbers written in ``text`` (thousands separators dropped)."""
    return [float(match) for match in _NUMBER.findall(_THOUSANDS.sub("", text))]


def is_correct(task: Task, response: str) -> bool:
    """Whether ``response`` contains the task's answer (module docstring)."""
    if task.kind in ("arithmetic", "units"):
        return float(task.answer) in numbers_in(response)
    names = (task.answer, *task.aliases)
    return any(re.search(r"\b" + re.escape(name) + r"\b", response, flags=re.IGNORECASE) for name in names)


def true_ratings(task: Task, response: str, tokenizer) -> dict[str, float]:
    """The true objectives of the demo on their raw scales: ``helpfulness`` in {0, 1},
    ``verbosity`` = response tokens."""
    return {
        "helpfulness": float(is_correct(task, response)),
        "verbosity": float(len(tokenizer(response, add_special_tokens=False)["input_ids"])),
    }


def capped_true_ratings(task: Task, response: str, tokenizer, max_tokens: int | None = None) -> dict[str, float]:
    """:func:`true_ratings` with verbosity capped at ``max_tokens`` (the sampling budget: decoding
    and re-encoding a cut response can give a token more than was generated)."""
    ratings = true_ratings(task, response, tokenizer)
    if max_tokens is not None:
        ratings["verbosity"] = min(ratings["verbosity"], float(max_tokens))
    return ratings


def rate_record(record: dict, response: str, tokenizer) -> dict[str, float]:
    """The true objectives of a response to a prompt-file row written by the demo (the row holds
    the task's fields and ``max_tokens``): the DPA loop's ``evaluation.true_ratings``."""
    return capped_true_ratings(Task.from_record(record), response, tokenizer, record.get("max_tokens"))
