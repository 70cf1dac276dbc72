"""pyalign's records: what every data-set adapter produces and every trainer consumes.

- :class:`PreferencePair`: ``prompt`` (the user's text, or the conversation so far as chat
  messages, ending with the user's turn), the ``chosen`` and ``rejected`` assistant replies, an
  optional ``system`` prompt and optional quality scores of the two replies (``chosen_score``,
  ``rejected_score``; used by reward-augmented relabeling).
- :class:`RatingRecord`: one response with its per-attribute ratings (``{prompt, response,
  ratings}``), for multi-objective reward models (DPA).

A prompt of one user message is stored as its text, so single-turn data has one form whatever
file it came from; a leading system message is moved to ``system``. Multi-turn prompts stay chat
messages and go through the tokenizer's chat template as messages.

pyalign's own JSONL format (the ``pairs`` schema) is one object per line:
``{"prompt": str | [messages], "chosen": str, "rejected": str}`` plus optional ``"system"``,
``"chosen_score"``, ``"rejected_score"`` and ``"meta"`` (free-form provenance, ignored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
PAIR_FIELDS = ("prompt", "chosen", "rejected", "system", "chosen_score", "rejected_score", "meta")


class RowError(ValueError):
    """One row does not fit its schema; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PreferencePair:
    prompt: Any  # str, or a tuple of {"role", "content"} messages ending with the user's turn
    chosen: str
    rejected: str
    system: str | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None

    def __post_init__(self):
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(dict(m) for m in self.prompt))

    def to_record(self) -> dict:
        """The JSON object of this pair in the ``pairs`` schema (absent fields left out)."""
        record = {"prompt": prompt_json(self.prompt), "chosen": self.chosen, "rejected": self.rejected}
        for name in ("system", "chosen_score", "rejected_score"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        return record


@dataclass(frozen=True)
class RatingRecord:
    prompt: Any  # as PreferencePair.prompt
    response: str
    ratings: dict = field(default_factory=dict)  # attribute -> rating
    system: str | None = None

    def __post_init__(self):
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(dict(m) for m in self.prompt))

    def to_record(self) -> dict:
        record = {"prompt": prompt_json(self.prompt), "response": self.response, "ratings": dict(self.ratings)}
        if self.system is not None:
            record["system"] = self.system
        return record


def prompt_json(prompt) -> str | list[dict]:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


# ----------------------------------------------------------------------------- field checks

def text_field(record: dict, name: str, *, optional: bool = False) -> str | None:
    if name not in record or record[name] is None:
        if optional:
            return None
        raise RowError(name, f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise RowError(name, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def score_field(record: dict, name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(name, f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def check_messages(value: Any, name: str) -> list[dict]:
    """A list of chat messages: each a mapping with a known ``role`` and a string ``content``.
    Other keys (Arrow fills absent struct fields with null) are dropped."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(name, f"field {name!r} must be a non-empty list of chat messages, got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(name, f"field {name!r}[{i}] must be a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(name, f"field {name!r}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(name, f"field {name!r}[{i}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)) and not value:
        return "an empty list"
    return type(value).__name__


def normalize_prompt(messages: Sequence[dict], name: str, system: str | None = None):
    """``(prompt, system)`` from a conversation that ends with the user's turn: a leading system
    message becomes ``system`` (an error if ``system`` is given too), one user message becomes
    its text."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        if system is not None:
            raise RowError(name, f"field {name!r} starts with a system message and a separate system prompt is given too")
        system = messages.pop(0)["content"]
    if not messages:
        raise RowError(name, f"field {name!r} has no user message")
    for i, message in enumerate(messages):
        if message["role"] == "system":
            raise RowError(name, f"field {name!r}: a system message is only allowed first, found one at turn {i}")
    if messages[-1]["role"] != "user":
        raise RowError(name, f"field {name!r} must end with the user's turn, ends with {messages[-1]['role']!r}")
    if len(messages) == 1:
        return messages[0]["content"], system
    return tuple(messages), system


def prompt_field(record: dict, name: str = "prompt", system: str | None = None):
    """A prompt given as text or as chat messages; returns ``(prompt, system)``."""
    if name not in record or record[name] is None:
        raise RowError(name, f"missing field {name!r}")
    value = record[name]
    if isinstance(value, str):
        return value, system
    return normalize_prompt(check_messages(value, name), name, system)


def reply_field(record: dict, name: str) -> str:
    """An assistant reply given as text, or as a list holding one assistant message."""
    if name not in record or record[name] is None:
        raise RowError(name, f"missing field {name!r}")
    value = record[name]
    if isinstance(value, str):
        return value
    messages = check_messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(name, f"field {name!r} must be a string or one assistant message, got {len(messages)} "
                             f"message(s) with roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def split_conversations(chosen: Sequence[dict], rejected: Sequence[dict], names=("chosen", "rejected")):
    """Two whole conversations that share everything but the last assistant reply ->
    ``(prompt messages, chosen reply, rejected reply)``."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise RowError(names[0], f"fields {names[0]!r} and {names[1]!r} are the same conversation")
    for name, conversation in zip(names, (chosen, rejected)):
        tail = conversation[shared:]
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            raise RowError(name, f"field {name!r} must end with one assistant reply after the prefix it shares "
                                 f"with the other; after {shared} shared turn(s) it has roles "
                                 f"{[m['role'] for m in tail]}")
    if shared == 0:
        raise RowError(names[0], f"fields {names[0]!r} and {names[1]!r} share no prompt")
    return list(chosen[:shared]), chosen[shared]["content"], rejected[shared]["content"]


def check_pair(pair: PreferencePair) -> PreferencePair:
    """Refuse a pair that teaches nothing (raises :class:`RowError` naming the field): an empty
    prompt or reply, or a chosen reply equal to the rejected one (its loss gradient is zero, but
    it still counts in every mean and dilutes the batch)."""
    if isinstance(pair.prompt, str) and not pair.prompt.strip():
        raise RowError("prompt", "field 'prompt' is empty")
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise RowError(name, f"field {name!r} is empty")
    if pair.chosen == pair.rejected:
        raise RowError("rejected", "fields 'chosen' and 'rejected' are the same text (the pair prefers nothing)")
    return pair


# ----------------------------------------------------------------------------- the pairs schema

def pair_from_record(record: Any) -> PreferencePair:
    """One object of pyalign's JSONL pairs format; raises :class:`RowError` naming the field."""
    if not isinstance(record, dict):
        raise RowError("", f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(PAIR_FIELDS))
    if unknown:
        raise RowError(unknown[0], f"unknown field {unknown[0]!r} (expected {', '.join(PAIR_FIELDS)})")
    system = text_field(record, "system", optional=True)
    prompt, system = prompt_field(record, "prompt", system)
    return PreferencePair(
        prompt, text_field(record, "chosen"), text_field(record, "rejected"), system,
        score_field(record, "chosen_score"), score_field(record, "rejected_score"),
    )


def read_jsonl_records(path: str | Path):
    """``(line number, record)`` for each non-blank line; a broken line, or one that is not UTF-8
    (with the file's byte offset), is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    offset = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte offset {start + error.start}: "
                                 f"0x{raw[error.start]:02x})") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file in the pairs schema; errors name the file, the line and the field."""
    pairs = []
    for line_number, record in read_jsonl_records(path):
        try:
            pairs.append(check_pair(pair_from_record(record)))
        except RowError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file")
    return pairs


def write_preference_pairs(path: str | Path, pairs: Sequence[PreferencePair | dict]) -> Path:
    """Write pairs as JSONL, atomically (the inverse of :func:`load_preference_pairs`)."""
    from pyalign.io import write_jsonl_atomic  # noqa: PLC0415

    return write_jsonl_atomic(path, [p if isinstance(p, dict) else p.to_record() for p in pairs])
