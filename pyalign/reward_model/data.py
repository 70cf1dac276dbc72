"""Ratings data for the reward model: JSONL ``{prompt, response, ratings: {name: value}}`` (and an
optional ``system``) in, padded ``[B, T]`` batches with 0-100 targets out. ``prompt`` is a text or
a conversation (chat messages ending with the user's turn), read by the data layer's rules
(:func:`pyalign.data.pairs.prompt_field`), so the rating records ``pyalign data export --ratings``
writes (HelpSteer2's multi-turn prompts included) load as they are.

Rescaling (the DPA paper rescales every rating to 0-100 before training): objective i has an
input scale ``[low_i, high_i]`` (e.g. HelpSteer's 0-4) and a rating ``r`` becomes

    y = 100 * (r - low_i) / (high_i - low_i)

so ``low_i -> 0`` and ``high_i -> 100``. The scale is given per objective (config
``objectives: {helpfulness: [0, 4]}``); when it is not, it is the min and max of that
objective's ratings in the training file. Either way it is stored with the reward model, whose
scores are on the 0-100 scale. With a given scale, a rating outside it is an error (a typo or a
wrong scale); with an inferred one, held-out ratings may fall outside and map below 0 or above 100.

Tokenisation is the policy's (:mod:`pyalign.data`): the prompt (text, or the conversation's
messages) through the chat template with the optional system prompt, the response tokenised on
its own with EOS appended, the same truncation policy (prompt keeps its last
``max_prompt_length`` tokens, the response is cut to fit ``max_length``). The reward is read at
the last non-padding token: the EOS that ends the response (or the last kept token of a cut
one). Batches are right-padded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyalign.data import encode_prompt, encode_response, pad_token_id, truncate_pair
from pyalign.data.pairs import RowError, prompt_field

RATING_FIELDS = ("prompt", "response", "ratings", "system")


@dataclass(frozen=True)
class ObjectiveScale:
    """One objective: its name and the input scale ``[low, high]`` mapped onto 0-100."""

    name: str
    low: float
    high: float

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"objectives: expected a non-empty name, got {self.name!r}")
        for bound in ("low", "high"):
            value = getattr(self, bound)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"objectives.{self.name}.{bound}: expected a finite number, got {value!r}")
        if not self.high > self.low:
            raise ValueError(f"objectives.{self.name}: expected low < high, got [{self.low}, {self.high}]")

    def to_100(self, value: float | Tensor):
        return 100.0 * (value - self.low) / (self.high - self.low)

    def from_100(self, value: float | Tensor):
        return self.low + (self.high - self.low) * value / 100.0


@dataclass(frozen=True)
class RatedExample:
    prompt: Any  # str, or a tuple of {"role", "content"} messages ending with the user's turn
    response: str
    ratings: dict[str, float]  # on the input scale, exactly as in the file
    system: str | None = None

    def __post_init__(self):
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(dict(m) for m in self.prompt))


def _rating(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: ratings.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: ratings.{name} must be finite, got {value!r}")
    return float(value)


def rated_example_from_record(record: object, where: str, objectives: Sequence[str]) -> RatedExample:
    """One JSON object -> an example; errors name ``where`` (file:line) and the field. Ratings of
    objectives not in ``objectives`` are allowed and ignored (a file may rate more than a model
    predicts); a missing one is an error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(RATING_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (expected prompt, response, ratings, system)")
    for name in ("prompt", "response"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(record["response"], str):
        raise ValueError(f"{where}: field 'response' must be a string, got {type(record['response']).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    if not isinstance(record["prompt"], (str, list)):
        raise ValueError(f"{where}: field 'prompt' must be a string or a list of chat messages, "
                         f"got {type(record['prompt']).__name__}")
    try:  # a one-message conversation becomes its text, a leading system message the system prompt
        prompt, system = prompt_field(record, "prompt", system)
    except RowError as error:
        raise ValueError(f"{where}: {error}") from None
    ratings = record.get("ratings")
    if not isinstance(ratings, dict):
        raise ValueError(f"{where}: field 'ratings' must be an object {{objective: number}}, "
                         f"got {'nothing' if ratings is None else type(ratings).__name__}")
    for name in objectives:
        if name not in ratings:
            raise ValueError(f"{where}: ratings is missing objective {name!r} "
                             f"(expected every one of {', '.join(objectives)})")
    return RatedExample(prompt, record["response"],
                        {name: _rating(ratings[name], where, name) for name in objectives}, system)


def load_rated_examples(path: str | Path, objectives: Sequence[str]) -> list[RatedExample]:
    """Read a ratings JSONL file (blank lines skipped); errors name file, line and field."""
    if not objectives:
        raise ValueError("objectives: expected at least one objective name")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ratings data file not found")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            examples.append(rated_example_from_record(record, where, objectives))
    if not examples:
        raise ValueError(f"{path}: no rated examples in the file")
    return examples


def resolve_scales(spec: Mapping[str, Sequence[float] | None] | Sequence[str],
                   examples: Sequence[RatedExample]) -> list[ObjectiveScale]:
    """The scale of each objective: given ``[low, high]``, or (None / a bare name) the min and
    max of the examples' ratings. Raises when an inferred scale is degenerate (all ratings equal)."""
    items = list(spec.items()) if isinstance(spec, Mapping) else [(name, None) for name in spec]
    scales = []
    for name, bounds in items:
        if bounds is None:
            values = [example.ratings[name] for example in examples]
            if not values or min(values) == max(values):
                raise ValueError(f"objectives.{name}: cannot infer a scale from the training ratings "
                                 f"(all equal to {values[0] if values else None}); give [low, high]")
            scales.append(ObjectiveScale(name, min(values), max(values)))
        else:
            bounds = list(bounds)
            if len(bounds) != 2:
                raise ValueError(f"objectives.{name}: expected [low, high], got {bounds!r}")
            scales.append(ObjectiveScale(name, *bounds))
    return scales


def check_within_scales(examples: Sequence[RatedExample], scales: Sequence[ObjectiveScale], where: str) -> None:
    """Every rating inside its objective's given scale (used for explicitly given scales)."""
    for number, example in enumerate(examples, start=1):
        for scale in scales:
            value = example.ratings[scale.name]
            if not scale.low <= value <= scale.high:
                raise ValueError(f"{where}: example {number}: ratings.{scale.name} = {value} is outside its "
                                 f"scale [{scale.low}, {scale.high}]")


@dataclass(frozen=True)
class TokenizedRated:
    input_ids: list[int]  # prompt + response (+ EOS), after truncation
    targets: list[float]  # 0-100, one per objective
    group: int  # examples with the same (system, prompt) share a group (pairwise accuracy)


def encode_prompt_response(tokenizer, prompt, response: str, system: str | None,
                           max_length: int, max_prompt_length: int) -> list[int]:
    """The token ids a reward model reads: the policy's tokenisation and truncation policy."""
    cut = truncate_pair(encode_prompt(tokenizer, prompt, system), encode_response(tokenizer, response), [],
                        max_length, max_prompt_length)
    return cut.prompt_ids + cut.chosen_ids


def prompt_groups(keys: Sequence[tuple]) -> list[int]:
    """Group index of each ``(system, prompt)`` key (first appearance order); a prompt is a text
    or chat messages."""
    from pyalign.generation import hashable_prompt  # noqa: PLC0415

    index: dict[tuple, int] = {}
    return [index.setdefault((system, hashable_prompt(prompt)), len(index)) for system, prompt in keys]


def collate_rated(items: Sequence[TokenizedRated], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` ``[B, T]`` right-padded, ``targets`` ``[B, k]`` (0-100,
    float32) and ``group`` ``[B]``."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, :len(item.input_ids)] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, :len(item.input_ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": torch.tensor([item.targets for item in items], dtype=torch.float32),
        "group": torch.tensor([item.group for item in items], dtype=torch.long),
    }


class RatingsDataset(torch.utils.data.Dataset):
    """Tokenised rated examples with targets on the 0-100 scale; item ``i`` is the i-th example."""

    def __init__(self, examples: Sequence[RatedExample], scales: Sequence[ObjectiveScale], tokenizer,
                 max_length: int, max_prompt_length: int):
        self.examples = list(examples)
        self.scales = list(scales)
        groups = prompt_groups([(e.system, e.prompt) for e in self.examples])
        self.items = [
            TokenizedRated(
                encode_prompt_response(tokenizer, e.prompt, e.response, e.system, max_length, max_prompt_length),
                [float(s.to_100(e.ratings[s.name])) for s in self.scales],
                group,
            )
            for e, group in zip(self.examples, groups)
        ]
        self.pad_token_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedRated:
        return self.items[index]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_rated([self.items[int(i)] for i in indices], self.pad_token_id)
