"""Data-set schemas -> pyalign's records (docs/data.md describes each mapping with examples).

One adapter per schema; each turns the rows of a data set (dicts, as ``datasets`` or a JSONL file
gives them) into :class:`~pyalign.data.pairs.PreferencePair` records, and raises
:class:`~pyalign.data.pairs.RowError` naming the field when a row does not fit.

==============  =====================================================================================
schema          rows
==============  =====================================================================================
pairs           pyalign's JSONL: ``prompt`` (text or messages), ``chosen``, ``rejected`` (+ system, scores)
messages        chat messages: ``messages`` (the conversation so far) or ``prompt`` as messages, with
                ``chosen``/``rejected`` replies; or whole conversations in ``chosen``/``rejected``
ultrafeedback   UltraFeedback binarized: ``chosen``/``rejected`` conversations, ``score_chosen``/``score_rejected``
hh_rlhf         Anthropic HH-RLHF: whole dialogues as text (``\\n\\nHuman: ... \\n\\nAssistant: ...``)
pku_saferlhf    PKU-SafeRLHF: ``response_0``/``response_1``, ``better_response_id``, ``safer_response_id``
helpsteer2      HelpSteer / HelpSteer2: one response per row rated 0-4 on five attributes
ratings         pyalign's rating records ``{prompt, response, ratings}`` (reward models only)
==============  =====================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from pyalign.data.pairs import (
    PAIR_FIELDS, PreferencePair, RatingRecord, RowError, check_messages, check_pair, normalize_prompt, pair_from_record,
    prompt_field, reply_field, score_field, split_conversations, text_field,
)

Rows = Iterable[tuple[int, Any]]  # (row index, row)
OnError = Callable[[int, RowError], None]


class Adapter:
    name = ""
    dimensions: tuple[str, ...] = ()  # empty: the schema has one pair stream
    aliases: ClassVar[dict[str, str]] = {}  # other accepted dimension names -> dimension
    score_range: tuple[float, float] | None = None  # of chosen_score/rejected_score, when known
    has_pairs = True
    has_ratings = False

    def dimension(self, value: str | None) -> str | None:
        """The canonical dimension for ``value``; raises ValueError naming the choices."""
        if not self.dimensions:
            if value is not None:
                raise ValueError(f"dimension: the {self.name} schema has one pair stream, got dimension {value!r}")
            return None
        if value is None:
            raise ValueError(f"dimension: the {self.name} schema has one pair stream per dimension; "
                             f"choose one of {', '.join(self.dimensions)}")
        canonical = self.aliases.get(value, value)
        if canonical not in self.dimensions:
            raise ValueError(f"dimension: expected one of {', '.join(self.dimensions)} for the {self.name} "
                             f"schema, got {value!r}")
        return canonical

    def row_pairs(self, row: dict, dimension: str | None) -> list[PreferencePair]:
        raise NotImplementedError

    def pairs(self, rows: Rows, dimension: str | None, on_error: OnError) -> Iterator[tuple[int, PreferencePair]]:
        """``(row index, pair)`` for every pair of ``rows``; bad rows (and pairs that teach nothing:
        :func:`~pyalign.data.pairs.check_pair`) go to ``on_error``."""
        for index, row in rows:
            try:
                if not isinstance(row, dict):
                    raise RowError("", f"expected an object (a mapping of fields), got {type(row).__name__}")
                pairs = [check_pair(pair) for pair in self.row_pairs(row, dimension)]
            except RowError as error:
                on_error(index, error)
                continue
            for pair in pairs:
                yield index, pair

    def ratings(self, rows: Rows, on_error: OnError) -> Iterator[tuple[int, RatingRecord]]:
        raise ValueError(f"schema: {self.name} has no per-response ratings (rating records come from "
                         f"{', '.join(n for n, a in ADAPTERS.items() if a.has_ratings)})")


def _scores(row: dict) -> tuple[float | None, float | None]:
    chosen = score_field(row, "chosen_score") if row.get("chosen_score") is not None else score_field(row, "score_chosen")
    rejected = (score_field(row, "rejected_score") if row.get("rejected_score") is not None
                else score_field(row, "score_rejected"))
    return chosen, rejected


class PairsAdapter(Adapter):
    name = "pairs"

    def row_pairs(self, row, dimension):
        return [pair_from_record(row)]


class MessagesAdapter(Adapter):
    """Conversational rows. The prompt is ``messages`` (or ``prompt``: text or messages); the
    replies are text or one assistant message each. When ``chosen``/``rejected`` hold whole
    conversations they are split at their shared prefix (checked against the prompt if given)."""

    name = "messages"

    def row_pairs(self, row, dimension):
        system = text_field(row, "system", optional=True)
        prompt_name = "messages" if row.get("messages") is not None else "prompt"
        for name in ("chosen", "rejected"):
            if row.get(name) is None:
                raise RowError(name, f"missing field {name!r}")
        whole = [isinstance(row[n], (list, tuple)) and len(row[n]) > 1 for n in ("chosen", "rejected")]
        if any(whole):
            chosen_conv = check_messages(row["chosen"], "chosen")
            rejected_conv = check_messages(row["rejected"], "rejected")
            shared, chosen, rejected = split_conversations(chosen_conv, rejected_conv)
            if row.get(prompt_name) is not None:
                given = row[prompt_name]
                given = [{"role": "user", "content": given}] if isinstance(given, str) else check_messages(given, prompt_name)
                if given != shared and given != [m for m in shared if m["role"] != "system"]:
                    raise RowError(prompt_name, f"field {prompt_name!r} differs from the conversation that "
                                                "'chosen' and 'rejected' share")
            prompt, system = normalize_prompt(shared, "chosen", system)
        else:
            if row.get(prompt_name) is None:
                raise RowError("messages", "missing field 'messages' (or 'prompt'), and 'chosen'/'rejected' are "
                                           "not whole conversations")
            prompt, system = prompt_field(row, prompt_name, system)
            chosen, rejected = reply_field(row, "chosen"), reply_field(row, "rejected")
        return [PreferencePair(prompt, chosen, rejected, system, *_scores(row))]


class UltraFeedbackAdapter(MessagesAdapter):
    """UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized, splits ``train_prefs`` /
    ``test_prefs``): ``chosen``/``rejected`` are ``[user, assistant]`` message lists, scores are
    GPT-4 overall ratings on a 1-10 scale."""

    name = "ultrafeedback"
    score_range = (1.0, 10.0)

    def row_pairs(self, row, dimension):
        for name in ("score_chosen", "score_rejected"):
            if row.get(name) is None:
                raise RowError(name, f"missing field {name!r}")
        # The prompt is what chosen and rejected share; the `messages` column is the chosen
        # conversation (for SFT) and `prompt` repeats the first user turn.
        row = {k: v for k, v in row.items() if k not in ("messages", "prompt")}
        return super().row_pairs(row, dimension)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str, name: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user: a}, {assistant: b}]``; a paragraph that
    starts with neither speaker stays in the turn before it."""
    if not isinstance(text, str):
        raise RowError(name, f"field {name!r} must be a string, got {type(text).__name__}")
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise RowError(name, f"field {name!r} must start with '\\n\\nHuman: ', starts with {parts[0][:30]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


class HHRLHFAdapter(Adapter):
    """Anthropic/hh-rlhf (``data_dir``: helpful-base, harmless-base, helpful-online,
    helpful-rejection-sampled): ``chosen``/``rejected`` are whole dialogues that differ only in the
    last assistant turn; the shared dialogue before it is the prompt."""

    name = "hh_rlhf"

    def row_pairs(self, row, dimension):
        chosen = parse_hh_dialogue(row.get("chosen"), "chosen") if row.get("chosen") is not None else None
        rejected = parse_hh_dialogue(row.get("rejected"), "rejected") if row.get("rejected") is not None else None
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise RowError(name, f"missing field {name!r}")
        shared, chosen_reply, rejected_reply = split_conversations(chosen, rejected)
        prompt, system = normalize_prompt(shared, "chosen")
        return [PreferencePair(prompt, chosen_reply, rejected_reply, system)]


class PKUSafeRLHFAdapter(Adapter):
    """PKU-Alignment/PKU-SafeRLHF: two responses per prompt, ``better_response_id`` (helpfulness)
    and ``safer_response_id`` (harmlessness) in {0, 1}: one pair stream per dimension."""

    name = "pku_saferlhf"
    dimensions = ("helpful", "harmless")
    aliases: ClassVar[dict[str, str]] = {"helpfulness": "helpful", "better": "helpful", "harmlessness": "harmless", "safer": "harmless",
               "safety": "harmless", "safe": "harmless"}
    id_field: ClassVar[dict[str, str]] = {"helpful": "better_response_id", "harmless": "safer_response_id"}

    def row_pairs(self, row, dimension):
        prompt = text_field(row, "prompt")
        responses = [text_field(row, "response_0"), text_field(row, "response_1")]
        name = self.id_field[dimension]
        choice = row.get(name)
        if choice is None:
            raise RowError(name, f"missing field {name!r}")
        if isinstance(choice, bool) or choice not in (0, 1):
            raise RowError(name, f"field {name!r} must be 0 or 1, got {choice!r}")
        return [PreferencePair(prompt, responses[int(choice)], responses[1 - int(choice)])]


_HELPSTEER_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


def parse_helpsteer_prompt(text: str):
    """HelpSteer2's multi-turn prompts join the turns with ``<extra_id_1>Assistant`` /
    ``<extra_id_1>User`` lines: ``"u1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nu2"``."""
    parts = _HELPSTEER_TURN.split(text)
    messages = [{"role": "user", "content": parts[0]}]
    messages += [{"role": "user" if who == "User" else "assistant", "content": content}
                 for who, content in zip(parts[1::2], parts[2::2])]
    return normalize_prompt(messages, "prompt")[0]


class HelpSteerAdapter(Adapter):
    """nvidia/HelpSteer2 (and HelpSteer): one response per row with five 0-4 ratings. Rows with the
    same prompt (consecutive in HelpSteer2) are compared on the chosen attribute: every two
    responses with different ratings make a pair, the higher-rated one chosen; ties make none.
    Rating records keep every row with all five ratings."""

    name = "helpsteer2"
    dimensions = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    score_range = (0.0, 4.0)
    has_ratings = True

    def record(self, row: dict) -> RatingRecord:
        raw_prompt = text_field(row, "prompt")
        response = text_field(row, "response")
        ratings = {}
        for attribute in self.dimensions:
            value = row.get(attribute)
            if value is None:
                raise RowError(attribute, f"missing field {attribute!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 4:
                raise RowError(attribute, f"field {attribute!r} must be a rating from 0 to 4, got {value!r}")
            ratings[attribute] = value
        return RatingRecord(parse_helpsteer_prompt(raw_prompt), response, ratings)

    def _records(self, rows: Rows, on_error: OnError) -> Iterator[tuple[int, str, RatingRecord]]:
        for index, row in rows:
            try:
                if not isinstance(row, dict):
                    raise RowError("", f"expected an object (a mapping of fields), got {type(row).__name__}")
                yield index, row["prompt"], self.record(row)
            except RowError as error:
                on_error(index, error)

    def ratings(self, rows, on_error):
        for index, _, record in self._records(rows, on_error):
            yield index, record

    def pairs(self, rows, dimension, on_error):
        groups: dict[str, list[tuple[int, RatingRecord]]] = {}
        for index, raw_prompt, record in self._records(rows, on_error):
            groups.setdefault(raw_prompt, []).append((index, record))
        for members in groups.values():
            for i, (index_a, a) in enumerate(members):
                for index_b, b in members[i + 1:]:
                    score_a, score_b = a.ratings[dimension], b.ratings[dimension]
                    if score_a == score_b:
                        continue
                    (_, win), (_, lose) = sorted([(score_a, a), (score_b, b)], key=lambda s: -s[0])
                    yield index_a, PreferencePair(a.prompt, win.response, lose.response, None,
                                                  float(max(score_a, score_b)), float(min(score_a, score_b)))


class RatingsAdapter(Adapter):
    """pyalign's rating records: ``{"prompt", "response", "ratings": {attribute: number}}``."""

    name = "ratings"
    has_pairs = False
    has_ratings = True

    def ratings(self, rows, on_error):
        for index, row in rows:
            try:
                if not isinstance(row, dict):
                    raise RowError("", f"expected an object, got {type(row).__name__}")
                unknown = sorted(set(row) - {"prompt", "response", "ratings", "system"})
                if unknown:
                    raise RowError(unknown[0], f"unknown field {unknown[0]!r} (expected prompt, response, ratings, system)")
                system = text_field(row, "system", optional=True)
                prompt, system = prompt_field(row, "prompt", system)
                ratings = row.get("ratings")
                if not isinstance(ratings, dict) or not ratings:
                    raise RowError("ratings", f"field 'ratings' must be a non-empty mapping, got {ratings!r}")
                checked = {str(k): score_field({k: v}, k) for k, v in ratings.items()}
                if any(v is None for v in checked.values()):
                    raise RowError("ratings", "field 'ratings' has a null rating")
                yield index, RatingRecord(prompt, text_field(row, "response"), checked, system)
            except RowError as error:
                on_error(index, error)

    def pairs(self, rows, dimension, on_error):
        raise ValueError("schema: ratings records hold single responses, not pairs")


ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (PairsAdapter(), MessagesAdapter(), UltraFeedbackAdapter(), HHRLHFAdapter(),
                        PKUSafeRLHFAdapter(), HelpSteerAdapter(), RatingsAdapter())
}
SCHEMA_ALIASES = {"helpsteer": "helpsteer2", "ultrafeedback_binarized": "ultrafeedback", "hh-rlhf": "hh_rlhf",
                  "pku-saferlhf": "pku_saferlhf", "pku": "pku_saferlhf", "chat": "messages"}
SCHEMAS = tuple(ADAPTERS)


def get_adapter(schema: str) -> Adapter:
    name = SCHEMA_ALIASES.get(schema, schema)
    if name not in ADAPTERS:
        raise ValueError(f"schema: expected one of {', '.join(SCHEMAS)}, got {schema!r}")
    return ADAPTERS[name]


def guess_schema(columns: Iterable[str], first_row: dict | None) -> str:
    """The schema whose columns these are; a ValueError naming the columns when none fits."""
    cols = set(columns)
    row = first_row if isinstance(first_row, dict) else {}
    if "response_0" in cols and cols & {"better_response_id", "safer_response_id"}:
        return "pku_saferlhf"
    if {"prompt", "response"} <= cols and cols & set(HelpSteerAdapter.dimensions):
        return "helpsteer2"
    if {"prompt", "response", "ratings"} <= cols:
        return "ratings"
    if {"chosen", "rejected", "score_chosen", "score_rejected"} <= cols and isinstance(row.get("chosen"), list):
        return "ultrafeedback"
    if {"chosen", "rejected"} <= cols and "prompt" not in cols and "messages" not in cols:
        chosen = row.get("chosen")
        if isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:"):
            return "hh_rlhf"
    if {"chosen", "rejected"} <= cols:
        lists = any(isinstance(row.get(n), list) for n in ("chosen", "rejected"))
        if "messages" in cols or lists:
            return "messages"
        if "prompt" in cols:
            return "pairs" if cols <= set(PAIR_FIELDS) else "messages"
    raise ValueError(f"schema: cannot tell the schema from the columns {sorted(cols)}; "
                     f"name it with schema: one of {', '.join(SCHEMAS)}")
