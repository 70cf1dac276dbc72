"""Preference directions of Directional Preference Alignment (docs/dpa.md, "Directions").

A user preference over k reward objectives is a unit vector ``v`` (``||v||_2 = 1``); the scalar
reward of a response is ``v . r(x, y)`` (:func:`weighted_reward`). The policy sees ``v`` in its
system prompt as integer weights ``round(100 * v_i)``::

    maximize weighted rating = helpfulness*71 + verbosity*-71

(:func:`direction_system_prompt`), and :func:`parse_direction` reads such a prompt back into a
unit vector. Style ``"words"`` (not in the paper) puts the same weights in words before the
formula, ``Aim for more helpfulness and much less verbosity. maximize weighted rating = ...``
(:func:`preference_words`), for a policy too small to read a minus sign (docs/dpa.md). Samplers:

- 2 objectives: the angle ``atan2(v_2, v_1)`` uniform in a range; the default ``[-pi/4, 0]``
  spans ``<1, 0>`` (helpfulness only) to ``<sqrt2/2, -sqrt2/2>`` (helpful and brief), the DPA
  paper's training distribution (:func:`sample_angle_directions`);
- k objectives: uniform on the part of the unit sphere where each component has a given sign,
  ``"+"`` (>= 0), ``"-"`` (<= 0), ``"0"`` (exactly 0) or ``"any"``
  (:func:`sample_sphere_directions`): a standard Gaussian vector normalised is uniform on the
  sphere, and since the Gaussian is symmetric, replacing a component by its absolute value (or
  minus it) keeps it uniform on the constrained orthant;
- evaluation: ``count`` evenly spaced angles from ``<1, 0>`` to ``<sqrt2/2, -sqrt2/2>``
  (:func:`evaluation_directions`).

Every function that takes a direction accepts any non-zero finite vector of the right length and
normalises it; a wrong length, a zero norm or a non-finite component is a ``ValueError`` naming
the argument.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence

DEFAULT_ANGLE_RANGE = (-math.pi / 4, 0.0)
SIGNS = ("+", "-", "0", "any")
PROMPT_STYLES = ("paper", "words")
PROMPT_PREFIX = "maximize weighted rating = "
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TERM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\*\s*([+-]?\d+)\s*")

Direction = tuple[float, ...]


def check_objectives(objectives: Sequence[str], *, name: str = "objectives") -> list[str]:
    """Objective names: a non-empty list of distinct identifiers (they are written into prompts)."""
    if isinstance(objectives, str) or not isinstance(objectives, Sequence) or not objectives:
        raise ValueError(f"{name}: expected a non-empty list of objective names, got {objectives!r}")
    for i, objective in enumerate(objectives):
        if not isinstance(objective, str) or not _NAME.fullmatch(objective):
            raise ValueError(f"{name}[{i}]: expected an identifier (letters, digits, '_'), got {objective!r}")
    if len(set(objectives)) != len(objectives):
        raise ValueError(f"{name}: names must be distinct, got {list(objectives)!r}")
    return list(objectives)


def unit_direction(v: Sequence[float], num_objectives: int | None = None, *, name: str = "v") -> Direction:
    """``v / ||v||`` as a tuple of floats; checks the length (when ``num_objectives`` is given),
    finiteness and a non-zero norm."""
    try:
        values = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of numbers, got {v!r}") from None
    if not values:
        raise ValueError(f"{name}: expected a non-empty direction, got {list(values)!r}")
    if num_objectives is not None and len(values) != num_objectives:
        raise ValueError(f"{name}: expected {num_objectives} components (one per objective), "
                         f"got {len(values)}: {values!r}")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"{name}: components must be finite, got {values!r}")
    norm = math.sqrt(sum(x * x for x in values))
    if norm == 0:
        raise ValueError(f"{name}: a direction needs a non-zero norm, got {values!r}")
    return tuple(x / norm for x in values)


def angle_of(v: Sequence[float]) -> float:
    """The angle ``atan2(v_2, v_1)`` of a 2-D direction (radians; 0 is ``<1, 0>``)."""
    v = unit_direction(v, 2)
    return math.atan2(v[1], v[0])


def direction_at(angle: float) -> Direction:
    """The 2-D unit vector ``<cos a, sin a>``."""
    if not math.isfinite(angle):
        raise ValueError(f"angle: expected a finite number of radians, got {angle!r}")
    return (math.cos(angle), math.sin(angle))


def _rng(seed: int | random.Random) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def sample_angle_directions(count: int, *, angle_range: Sequence[float] = DEFAULT_ANGLE_RANGE,
                            seed: int | random.Random = 0) -> list[Direction]:
    """``count`` 2-D directions whose angle is uniform in ``angle_range`` (radians, low <= high)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected a non-negative integer, got {count!r}")
    low, high = _angle_range(angle_range)
    rng = _rng(seed)
    return [direction_at(rng.uniform(low, high)) for _ in range(count)]


def _angle_range(angle_range: Sequence[float]) -> tuple[float, float]:
    if len(angle_range) != 2 or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in angle_range):
        raise ValueError(f"angle_range: expected [low, high] in radians, got {angle_range!r}")
    low, high = float(angle_range[0]), float(angle_range[1])
    if low > high or high - low > 2 * math.pi:
        raise ValueError(f"angle_range: expected low <= high and at most 2*pi wide, got {angle_range!r}")
    return low, high


def check_signs(signs: Sequence[str], num_objectives: int | None = None, *, name: str = "signs") -> list[str]:
    """Per-objective sign constraints: each one of ``+``, ``-``, ``0``, ``any``; not all ``0``."""
    if isinstance(signs, str) or not isinstance(signs, Sequence) or not signs:
        raise ValueError(f"{name}: expected a list with one of {SIGNS} per objective, got {signs!r}")
    if num_objectives is not None and len(signs) != num_objectives:
        raise ValueError(f"{name}: expected {num_objectives} entries (one per objective), got {len(signs)}")
    for i, sign in enumerate(signs):
        if sign not in SIGNS:
            raise ValueError(f"{name}[{i}]: expected one of {', '.join(SIGNS)}, got {sign!r}")
    if all(sign == "0" for sign in signs):
        raise ValueError(f"{name}: at least one objective must be free to be non-zero, got {list(signs)!r}")
    return list(signs)


def sample_sphere_directions(count: int, signs: Sequence[str], *,
                             seed: int | random.Random = 0) -> list[Direction]:
    """``count`` directions uniform on the region of the unit sphere where component i has sign
    ``signs[i]`` (``+``: >= 0, ``-``: <= 0, ``0``: zero, ``any``)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected a non-negative integer, got {count!r}")
    signs = check_signs(signs)
    rng = _rng(seed)
    directions = []
    while len(directions) < count:
        x = [rng.gauss(0.0, 1.0) for _ in signs]
        x = [abs(g) if s == "+" else -abs(g) if s == "-" else 0.0 if s == "0" else g for g, s in zip(x, signs)]
        norm = math.sqrt(sum(g * g for g in x))
        if norm > 1e-12:  # probability zero, but a zero vector has no direction
            directions.append(tuple(g / norm for g in x))
    return directions


def evaluation_directions(count: int = 10, *, angle_range: Sequence[float] = DEFAULT_ANGLE_RANGE) -> list[Direction]:
    """``count`` evenly spaced 2-D directions from the angle ``angle_range[1]`` down to
    ``angle_range[0]``: by default from ``<1, 0>`` to ``<sqrt2/2, -sqrt2/2>`` (both included)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count: expected an integer >= 2, got {count!r}")
    low, high = _angle_range(angle_range)
    return [direction_at(high + (low - high) * i / (count - 1)) for i in range(count)]


def prompt_weights(v: Sequence[float], num_objectives: int | None = None) -> list[int]:
    """The integer weights written into the prompt: ``round(100 * v_i)`` of the unit vector."""
    return [round(100 * x) for x in unit_direction(v, num_objectives)]


def preference_words(v: Sequence[float], objectives: Sequence[str]) -> str:
    """The weights of ``v`` in words: ``"Aim for more helpfulness and much less verbosity."``;
    per objective, by its prompt weight w: "slightly" for |w| < 25, none up to 59, "much" from 60;
    "more" for w > 0, "less" for w < 0; an objective of weight 0 is left out."""
    objectives = check_objectives(objectives)
    parts = []
    for name, weight in zip(objectives, prompt_weights(v, len(objectives))):
        if weight == 0:
            continue
        size = "slightly " if abs(weight) < 25 else "" if abs(weight) < 60 else "much "
        parts.append(f"{size}{'more' if weight > 0 else 'less'} {name}")
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Aim for {joined}."


def direction_system_prompt(v: Sequence[float], objectives: Sequence[str], *, prefix: str = "",
                            style: str = "paper") -> str:
    """The system prompt that tells the policy ``v``:
    ``prefix + "maximize weighted rating = helpfulness*71 + verbosity*-71"`` (style ``"paper"``),
    or with :func:`preference_words` and a space between the prefix and the formula (``"words"``)."""
    objectives = check_objectives(objectives)
    if style not in PROMPT_STYLES:
        raise ValueError(f"style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    weights = prompt_weights(v, len(objectives))
    terms = " + ".join(f"{name}*{weight}" for name, weight in zip(objectives, weights))
    words = f"{preference_words(v, objectives)} " if style == "words" else ""
    return f"{prefix}{words}{PROMPT_PREFIX}{terms}"


def parse_direction(text: str, objectives: Sequence[str]) -> Direction:
    """The unit vector written in ``text`` by :func:`direction_system_prompt` (anything before
    ``maximize weighted rating =`` is ignored). Every objective must appear exactly once, in the
    given order, with an integer weight; otherwise a ``ValueError`` says what is wrong."""
    objectives = check_objectives(objectives)
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    start = text.find(PROMPT_PREFIX.strip())
    if start < 0:
        raise ValueError(f"text: no {PROMPT_PREFIX.strip()!r} in {text!r}")
    body = text[start + len(PROMPT_PREFIX.strip()):]
    terms = body.split(" + ")
    if len(terms) != len(objectives):
        raise ValueError(f"text: expected {len(objectives)} terms 'name*weight' joined by ' + ' "
                         f"({', '.join(objectives)}), got {len(terms)} in {body.strip()!r}")
    weights = []
    for i, (term, objective) in enumerate(zip(terms, objectives)):
        match = _TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"text: term {i + 1} {term.strip()!r} is not 'name*integer'")
        if match.group(1) != objective:
            raise ValueError(f"text: term {i + 1} names {match.group(1)!r}, expected {objective!r} "
                             f"(objectives in order: {', '.join(objectives)})")
        weights.append(int(match.group(2)))
    if not any(weights):
        raise ValueError(f"text: every weight is 0 in {body.strip()!r}; a direction needs a non-zero norm")
    return unit_direction(weights, len(objectives), name="text")


def weighted_reward(v: Sequence[float], scores: Sequence[float] | Mapping[str, float],
                    objectives: Sequence[str] | None = None) -> float:
    """``v . r``: ``scores`` a sequence in objective order, or a mapping read in ``objectives``
    order (each objective must be there)."""
    if isinstance(scores, Mapping):
        if objectives is None:
            raise ValueError("objectives: needed to read scores given as a mapping")
        missing = [name for name in objectives if name not in scores]
        if missing:
            raise ValueError(f"scores: missing objective {missing[0]!r} (expected {', '.join(objectives)})")
        scores = [scores[name] for name in objectives]
    scores = [float(s) for s in scores]
    v = unit_direction(v, len(scores))
    return sum(a * b for a, b in zip(v, scores))
