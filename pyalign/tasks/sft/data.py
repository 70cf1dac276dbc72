"""Supervised fine-tuning examples: JSONL ``{prompt, response, system?}`` in, padded ``[B, T]``
batches out. ``prompt`` is the user's text or the conversation so far as chat messages (ending
with the user's turn), read as pyalign's pair records read theirs (:mod:`pyalign.data.pairs`).

Tokenisation is the preference data's (:mod:`pyalign.data`), with one response instead of two:
the prompt through the chat template (:func:`pyalign.data.encode_prompt`), the response tokenised
on its own with EOS appended (:func:`pyalign.data.encode_response`), the same truncation policy
(:func:`pyalign.data.truncate_pair`: the prompt keeps its last ``max_prompt_length`` tokens, the
response is cut to fit ``max_length``), and labels = input ids with every prompt position
``IGNORE_INDEX``, so only response tokens are trained on. A batch is right-padded with the pad
token, labels with ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from pyalign.data import IGNORE_INDEX, RowError, encode_prompt, encode_response, pad_token_id, truncate_pair
from pyalign.data.pairs import prompt_field, read_jsonl_records, reply_field, text_field

SFT_FIELDS = ("prompt", "response", "system", "meta")  # meta: free-form provenance, ignored


@dataclass(frozen=True)
class SFTExample:
    prompt: Any  # text, or chat messages ending with the user's turn (as PreferencePair.prompt)
    response: str
    system: str | None = None


def sft_example_from_record(record: object, *, ignore_fields: Iterable[str] = ()) -> SFTExample:
    """One JSON object -> an example; raises :class:`pyalign.data.RowError` naming the field.
    Fields in ``ignore_fields`` may be present and are skipped (e.g. ``ratings`` of
    reward-model data, so the same file can be fine-tuned on)."""
    if not isinstance(record, dict):
        raise RowError("", f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(SFT_FIELDS) - set(ignore_fields))
    if unknown:
        raise RowError(unknown[0], f"unknown field {unknown[0]!r} (expected {', '.join(SFT_FIELDS)})")
    system = text_field(record, "system", optional=True)
    prompt, system = prompt_field(record, "prompt", system)
    return SFTExample(prompt, reply_field(record, "response"), system)


def load_sft_examples(path: str | Path, *, ignore_fields: Iterable[str] = ()) -> list[SFTExample]:
    """Read a JSONL file of SFT examples (blank lines skipped); errors name file, line and field."""
    examples = []
    for line_number, record in read_jsonl_records(path):
        try:
            examples.append(sft_example_from_record(record, ignore_fields=ignore_fields))
        except RowError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
    if not examples:
        raise ValueError(f"{path}: no SFT examples in the file")
    return examples


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]  # after truncation


def tokenize_example(example: SFTExample, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedExample:
    response = encode_response(tokenizer, example.response)
    # The pair truncation policy with the response as both sides: one policy for every data kind.
    cut = truncate_pair(encode_prompt(tokenizer, example.prompt, example.system), response, response,
                        max_length, max_prompt_length)
    return TokenizedExample(cut.prompt_ids, cut.chosen_ids)


def collate_examples(items: Sequence[tuple[int, TokenizedExample]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (prompt positions ignored in the
    labels) and ``index`` ``[B]`` (each example's row in its dataset)."""
    width = max((len(ex.prompt_ids) + len(ex.response_ids) for _, ex in items), default=0)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (_, ex) in enumerate(items):
        n_prompt, n_total = len(ex.prompt_ids), len(ex.prompt_ids) + len(ex.response_ids)
        input_ids[row, :n_total] = torch.tensor(ex.prompt_ids + ex.response_ids, dtype=torch.long)
        labels[row, n_prompt:n_total] = torch.tensor(ex.response_ids, dtype=torch.long)
        attention_mask[row, :n_total] = 1
    index = torch.tensor([i for i, _ in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised SFT examples; item ``i`` is the i-th example (line, blank lines skipped)."""

    def __init__(self, examples: Sequence[SFTExample], tokenizer, max_length: int, max_prompt_length: int):
        self.examples = list(examples)
        self.tokenized = [tokenize_example(e, tokenizer, max_length, max_prompt_length) for e in self.examples]
        self.pad_token_id = pad_token_id(tokenizer)
        self.source: str | None = None  # the file, for messages

    @classmethod
    def from_jsonl(cls, path, tokenizer, max_length: int, max_prompt_length: int, *,
                   ignore_fields: Iterable[str] = ()) -> "SFTDataset":
        dataset = cls(load_sft_examples(path, ignore_fields=ignore_fields), tokenizer, max_length, max_prompt_length)
        dataset.source = str(path)
        return dataset

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> tuple[int, TokenizedExample]:
        return index, self.tokenized[index]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_examples([self[int(i)] for i in indices], self.pad_token_id)
