"""Data of the SPO demos: K preference dimensions that can coexist, some pairs in conflict.

Each dimension i (1..K) is one property of a response, written in a slot of its own:

    [Token_1][Skip_2][Token_3][Skip_4]The ocean covers most of the planet...
    slot 1   slot 2  slot 3   slot 4  text (sampled from pi_0)

slot i holds ``[Token_i]`` (the response has property i) or ``[Skip_i]`` (it lacks it). The
slots are always there and always in this order, so a response can have every property at once
(``[Token_1][Token_2][Token_3][Token_4]...``) and no property takes another one's place: if a
later round makes the model drop an earlier marker, the training signal did it, not a competition
for the first position (as in the paper's recipe, where markers are prepended and all compete for
the first token; docs/demo.md).

Pairs of dimension i (one per prompt, the same sampled text on both sides, so that the slots are
the only difference):

- preferred: ``[Token_i]`` in slot i; dispreferred: ``[Skip_i]``;
- every other slot j holds ``[Token_j]`` with probability ``other_prob``, the SAME on both sides
  (it does not decide the ranking; the paper's "other tokens are added to both");
- **conflict** (the paper's "modified" data: harmless but unhelpful refusals preferred on the
  harmlessness round): exactly ``round(conflict_rate * N)`` of dimension i's pairs (i >= 2), picked
  by a seeded shuffle, prefer a response that LACKS every earlier property over one that HAS them
  all: preferred ``[Skip_1]..[Skip_{i-1}][Token_i]``, dispreferred ``[Token_1]..[Token_{i-1}][Skip_i]``.
  Sequential DPO is told to unlearn the earlier markers on these pairs; SPO's offset
  ``sum_k kappa_k * (Delta_k(y_w) - Delta_k(y_l))`` is non-zero exactly there (with
  ``Delta_k = log pi_k - log pi_{k-1}``), since the earlier slots differ between the two sides.

Held-out pairs (the teacher-forced metric) are built with ``conflict_rate = 0``: on them the two
sides differ in slot i only, so each dimension's margin measures that property alone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pyalign.demo.markers import SYSTEM_PROMPT

MAX_DIMENSIONS = 9


def marker_tokens(num_dimensions: int) -> tuple[list[str], list[str]]:
    """(``[Token_1]..[Token_K]``, ``[Skip_1]..[Skip_K]``): the two fillers of each slot."""
    if not isinstance(num_dimensions, int) or not 1 <= num_dimensions <= MAX_DIMENSIONS:
        raise ValueError(f"num_dimensions: expected an integer in [1, {MAX_DIMENSIONS}], got {num_dimensions!r}")
    return ([f"[Token_{i}]" for i in range(1, num_dimensions + 1)],
            [f"[Skip_{i}]" for i in range(1, num_dimensions + 1)])


def slot_response(text: str, properties: Sequence[bool]) -> str:
    """The response with one slot per dimension in front of ``text``: ``[Token_i]`` where
    ``properties[i-1]`` is true, ``[Skip_i]`` where it is false."""
    markers, skips = marker_tokens(len(properties))
    return "".join(m if has else s for has, m, s in zip(properties, markers, skips)) + text


_SLOT = re.compile(r"\[(Token|Skip)_(\d)\]")


def response_properties(response: str, num_dimensions: int) -> list[bool]:
    """Inverse of :func:`slot_response` on the slots: which properties ``response`` has.
    Raises ValueError when the response does not start with the K slots in order."""
    properties = []
    position = 0
    for i in range(1, num_dimensions + 1):
        match = _SLOT.match(response, position)
        if match is None or int(match.group(2)) != i:
            raise ValueError(f"response: expected slot {i} ([Token_{i}] or [Skip_{i}]) at character "
                             f"{position}, got {response[position:position + 12]!r}")
        properties.append(match.group(1) == "Token")
        position = match.end()
    return properties


def dimension_pairs(prompts: Sequence[str], texts: Sequence[str], dimension: int, *, num_dimensions: int,
                    conflict_rate: float = 0.3, other_prob: float = 0.5, seed: int = 0,
                    system: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Preference pairs of ``dimension`` (1-based) as JSONL records ``{prompt, chosen, rejected,
    system}``, one per prompt, ``texts[k]`` on both sides of pair k (see the module docstring).

    ``conflict_rate``: the fraction of the pairs (exact, rounded) whose preferred response lacks
    every earlier property and whose dispreferred one has them all (dimension 1 has no earlier
    property: none conflict). ``other_prob``: probability of each non-deciding slot holding its
    marker (the same on both sides)."""
    if not isinstance(dimension, int) or not 1 <= dimension <= num_dimensions:
        raise ValueError(f"dimension: expected an integer in [1, {num_dimensions}], got {dimension!r}")
    marker_tokens(num_dimensions)  # validates num_dimensions
    if not 0.0 <= conflict_rate <= 1.0:
        raise ValueError(f"conflict_rate: expected a value in [0, 1], got {conflict_rate!r}")
    if not 0.0 <= other_prob <= 1.0:
        raise ValueError(f"other_prob: expected a value in [0, 1], got {other_prob!r}")
    if len(prompts) != len(texts) or not prompts:
        raise ValueError(f"texts: expected one text per prompt ({len(prompts)} prompts), got {len(texts)}")
    rng = random.Random(f"spo-data:{seed}:{dimension}")
    conflicting = set()
    if dimension > 1:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        conflicting = set(order[:round(conflict_rate * len(prompts))])
    records = []
    for k, (prompt, text) in enumerate(zip(prompts, texts)):
        shared = [rng.random() < other_prob for _ in range(num_dimensions)]
        chosen, rejected = list(shared), list(shared)
        chosen[dimension - 1], rejected[dimension - 1] = True, False
        if k in conflicting:
            for earlier in range(dimension - 1):
                chosen[earlier], rejected[earlier] = False, True
        record = {"prompt": prompt, "chosen": slot_response(text, chosen), "rejected": slot_response(text, rejected)}
        if system is not None:
            record["system"] = system
        records.append(record)
    return records


def conflicts_with_earlier(record: dict[str, str], dimension: int, num_dimensions: int) -> bool:
    """Whether the pair's dispreferred response has an earlier property (1..dimension-1) that the
    preferred one lacks."""
    chosen = response_properties(record["chosen"], num_dimensions)
    rejected = response_properties(record["rejected"], num_dimensions)
    return any(rejected[k] and not chosen[k] for k in range(dimension - 1))
