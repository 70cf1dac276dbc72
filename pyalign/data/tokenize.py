"""Preference pairs in, padded ``[2B, T]`` batches out.

Records come from :mod:`pyalign.data.pairs` (``PreferencePair``: prompt, chosen, rejected,
optional system); any data source becomes such records through :mod:`pyalign.data.sources`.

Tokenisation of one pair:

- prompt: the tokenizer's chat template applied to ``[system?, user]`` (a text prompt) or to
  ``[system?, *messages]`` (a multi-turn prompt: the conversation so far, ending with the user's
  turn) with ``add_generation_prompt=True``, rendered to text and tokenised with
  ``add_special_tokens=False`` (the template already carries any BOS it wants);
- each response: tokenised on its own (``add_special_tokens=False``), then ``eos_token_id`` appended;
- labels: the input ids with every prompt position set to ``-100``, so only response tokens count.

Truncation policy (stated once, applied everywhere, part of the cache fingerprint):

1. the prompt keeps its LAST ``max_prompt_length`` tokens (the end holds the question and the
   assistant header the response must follow);
2. each response is then cut on the right so that prompt + response <= ``max_length``
   (a cut response loses its EOS).

Collation: chosen rows first, then rejected rows (the ``[2B, T]`` layout of
:class:`pyalign.PreferenceLoss`), right-padded with the pad token (EOS if the tokenizer has none),
labels padded with ``-100``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pyalign.data.pairs import PreferencePair
from pyalign.io import file_fingerprint  # noqa: F401  (re-exported by pyalign.data)
from pyalign.reference import IGNORE_INDEX

# Bump when the tokenisation recipe above changes: it invalidates cached log-probs. (Multi-turn
# prompts were added without a bump: the token ids of text prompts did not change.)
TOKENIZATION_VERSION = 1


def prompt_messages(prompt, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a prompt: ``[system?, user]`` for text, ``[system?, *messages]`` for
    a conversation."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    if isinstance(prompt, str):
        return messages + [{"role": "user", "content": prompt}]
    return messages + [{"role": m["role"], "content": m["content"]} for m in prompt]


def encode_prompt(tokenizer, prompt, system: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt (text, or chat messages ending with the user's
    turn), ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: has no chat_template; preference data needs one to format prompts")
    text = tokenizer.apply_chat_template(
        prompt_messages(prompt, system), add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, response: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token; responses must end with one")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response ids only (after truncation)
    rejected_ids: list[int]


def truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """The truncation policy of the module docstring."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length: expected 0 < max_prompt_length < max_length={max_length}, got {max_prompt_length}"
        )
    prompt_ids = list(prompt_ids)[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    return TokenizedPair(prompt_ids, list(chosen_ids)[:budget], list(rejected_ids)[:budget])


def tokenize_pair(pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedPair:
    return truncate_pair(
        encode_prompt(tokenizer, pair.prompt, pair.system),
        encode_response(tokenizer, pair.chosen),
        encode_response(tokenizer, pair.rejected),
        max_length,
        max_prompt_length,
    )


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised pairs of one data source; item ``i`` is pair ``i`` as the source yields it (for
    a JSONL file of pairs: line ``i``, blank lines skipped), which is also the row of the cached
    frozen log-probs for that pair."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer, max_length: int, max_prompt_length: int,
                 *, source: str | None = None):
        self.source = source  # how messages name the data (a file), when known
        self.pairs = list(pairs)
        self.examples = [tokenize_pair(p, tokenizer, max_length, max_prompt_length) for p in self.pairs]
        self.pad_token_id = pad_token_id(tokenizer)

    @classmethod
    def from_source(cls, source, tokenizer, max_length: int, max_prompt_length: int) -> PreferenceDataset:
        """From any data source: a path, a mapping or a :class:`pyalign.data.sources.DataSource`."""
        from pyalign.data.sources import load_source  # noqa: PLC0415

        loaded = load_source(source)
        return cls(loaded.pairs, tokenizer, max_length, max_prompt_length, source=loaded.report.source)

    # The historical name: a JSONL path still works, and so does every other source.
    from_jsonl = from_source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, TokenizedPair]:
        return index, self.examples[index]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_pairs([self[int(i)] for i in indices], self.pad_token_id)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad_token nor an eos_token to pad with")
    return pad


def collate_pairs(items: Sequence[tuple[int, TokenizedPair]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[2B, T]`` (chosen rows, then rejected rows) and
    ``index`` ``[B]`` (each pair's row in its dataset)."""
    rows = [(ex.prompt_ids, ex.chosen_ids) for _, ex in items] + [(ex.prompt_ids, ex.rejected_ids) for _, ex in items]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(prompt + response, dtype=torch.long)
        labels[row, n_prompt:n_total] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, :n_total] = 1
    index = torch.tensor([i for i, _ in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


def embedding_rows(model) -> int | None:
    """How many token embeddings ``model`` has (its first embedding table: the tokens'), or None."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    return None


def check_token_ids(dataset, model, split: str, *, chunk: int = 256) -> None:
    """Refuse, naming the row and the id, data with a token id ``model`` has no embedding for (a
    tokenizer with tokens the model lacks): the embedding lookup would fail mid-run with an
    IndexError, or on CUDA read past the table. ``dataset``: anything with ``len()`` and
    ``batch(indices) -> {"input_ids": ...}``; rows of a pair batch are chosen then rejected."""
    rows = embedding_rows(model)
    if rows is None:
        return
    for start in range(0, len(dataset), chunk):
        indices = list(range(start, min(start + chunk, len(dataset))))
        ids = dataset.batch(indices).get("input_ids")
        if ids is None:  # a dataset of something else than token ids
            return
        bad = (ids >= rows) | (ids < 0)
        if not bad.any():
            continue
        row, position = bad.nonzero()[0].tolist()
        side = ""
        if ids.shape[0] == 2 * len(indices):
            side = " (chosen)" if row < len(indices) else " (rejected)"
        where = getattr(dataset, "source", None) or f"{split} data"
        raise ValueError(
            f"{where}: row {indices[row % len(indices)]}{side}: token id {int(ids[row, position])} is beyond the "
            f"model's vocabulary ({rows} token embeddings); the tokenizer has tokens the model does not (resize "
            "the model's embeddings to the tokenizer, or use the model's own tokenizer)")


def tokenization_fingerprint(tokenizer, max_length: int, max_prompt_length: int) -> dict[str, object]:
    """Everything that decides the token ids of a pair: recipe version, tokenizer identity
    (class, vocabulary with added tokens and rules), chat template and lengths. The folder the
    tokenizer came from is left out on purpose: moving a model does not change its tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer's JSON holds vocab, merges, added tokens, normaliser and pre-tokeniser.
    vocab = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()), ensure_ascii=False
    )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template, sort_keys=True
    )
    return {
        "version": TOKENIZATION_VERSION,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_token_id(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
