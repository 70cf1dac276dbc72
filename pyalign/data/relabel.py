"""Reward-augmented relabeling (Zhang et al., "Reward-Augmented Data Enhances Direct Preference
Alignment of LLMs"; docs/data.md).

A scored pair ``(x, y_w, y_l)`` with scores ``s_w != s_l`` becomes two reward-conditioned pairs:

- target ``s_w`` written into the system prompt: ``y_w`` preferred over ``y_l``;
- target ``s_l`` written into the system prompt: ``y_l`` preferred over ``y_w``.

Each response is preferred when the prompt asks for its own quality level, so the policy learns
what every level looks like instead of only the gap, and a good rejected response is not pushed
down everywhere. At inference, ask for the highest score (:func:`target_system_prompt`). Pairs
with equal scores would give two contradictory pairs and are dropped. The system text follows the
authors' release (scripts/reward_augmentation.py); an existing system prompt is kept after it.

Usable by every trainer: a data source with ``relabel: reward_augmented`` yields the relabelled
pairs (twice as many, the two of each source pair next to each other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyalign.data.pairs import PreferencePair

METHODS = ("reward_augmented",)
DEFAULT_TEMPLATE = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the "
    "following target scores{scale}:\n{name} score: {score}."
)
SCALE_TEXT = " (on a scale of {low}-{high}, where {low} is lowest and {high} is highest)"


@dataclass(frozen=True)
class RelabelSpec:
    method: str = "reward_augmented"
    template: str = DEFAULT_TEMPLATE  # placeholders: {score}, {name}, {scale}, {low}, {high}
    score_range: tuple | None = None  # (low, high); default: the schema's own range, if known
    score_name: str | None = None  # default: the dimension, capitalised, else "Overall"


def format_score(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else f"{score:g}"


def target_system_prompt(score: float, *, score_range=None, name: str = "Overall", template: str = DEFAULT_TEMPLATE) -> str:
    """The system prompt that asks for quality ``score`` (use the top of the range at inference)."""
    scale = ""
    low = high = ""
    if score_range is not None:
        low, high = format_score(score_range[0]), format_score(score_range[1])
        scale = SCALE_TEXT.format(low=low, high=high)
    return template.format(score=format_score(score), name=name, scale=scale, low=low, high=high)


def reward_augmented(pairs: Sequence[PreferencePair], *, score_range=None, name: str = "Overall",
                     template: str = DEFAULT_TEMPLATE) -> tuple[list[PreferencePair], int]:
    """The relabelled pairs and how many tied pairs were dropped. Every pair needs both scores."""
    out, ties = [], 0
    for i, pair in enumerate(pairs):
        if pair.chosen_score is None or pair.rejected_score is None:
            raise ValueError(
                f"relabel: reward_augmented needs chosen_score and rejected_score; pair {i} has "
                f"chosen_score={pair.chosen_score}, rejected_score={pair.rejected_score} (schemas with scores: "
                "ultrafeedback, helpsteer2, and pairs/messages rows that carry them)"
            )
        if pair.chosen_score == pair.rejected_score:
            ties += 1
            continue
        for score, chosen, rejected, chosen_score, rejected_score in (
            (pair.chosen_score, pair.chosen, pair.rejected, pair.chosen_score, pair.rejected_score),
            (pair.rejected_score, pair.rejected, pair.chosen, pair.rejected_score, pair.chosen_score),
        ):
            system = target_system_prompt(score, score_range=score_range, name=name, template=template)
            if pair.system:
                system += "\n\n" + pair.system
            out.append(PreferencePair(pair.prompt, chosen, rejected, system, chosen_score, rejected_score))
    return out, ties
