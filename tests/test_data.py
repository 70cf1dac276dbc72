"""pyalign.data: JSONL loading, chat-templated tokenisation, truncation policy, collation."""

import json

import pytest
import torch

from helpers_tiny_lm import make_tokenizer, write_jsonl
from pyalign.data import (
    IGNORE_INDEX, PreferenceDataset, PreferencePair, collate_pairs, encode_prompt, load_preference_pairs,
    tokenization_fingerprint, tokenize_pair, truncate_pair,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pair_is_chat_templated_with_eos_and_prompt_masked(tokenizer):
    pair = PreferencePair(prompt="why is the sky blue", chosen="the sun is bright", rejected="a cat", system="be good")
    example = tokenize_pair(pair, tokenizer, max_length=64, max_prompt_length=32)
    expected_prompt = ids(tokenizer, "<|system|> be good <|user|> why is the sky blue <|assistant|>")
    assert example.prompt_ids == expected_prompt
    assert example.chosen_ids == ids(tokenizer, "the sun is bright") + [tokenizer.eos_token_id]
    assert example.rejected_ids == ids(tokenizer, "a cat") + [tokenizer.eos_token_id]

    batch = collate_pairs([(7, example)], pad_id=tokenizer.pad_token_id)
    n_prompt = len(expected_prompt)
    chosen_row, rejected_row = batch["labels"]
    assert (chosen_row[:n_prompt] == IGNORE_INDEX).all()
    assert chosen_row[n_prompt:].tolist() == example.chosen_ids
    assert rejected_row[n_prompt : n_prompt + len(example.rejected_ids)].tolist() == example.rejected_ids
    assert (rejected_row[n_prompt + len(example.rejected_ids) :] == IGNORE_INDEX).all()
    assert batch["index"].tolist() == [7]


def test_collate_puts_chosen_rows_first_and_pads(tokenizer):
    pairs = [PreferencePair("what is a cat", "a small cat", "dog"), PreferencePair("how", "run fast now", "walk")]
    data = PreferenceDataset(pairs, tokenizer, max_length=64, max_prompt_length=32)
    batch = data.batch([1, 0])
    assert batch["input_ids"].shape[0] == 4
    assert batch["index"].tolist() == [1, 0]
    rows = [data.examples[1].chosen_ids, data.examples[0].chosen_ids,
            data.examples[1].rejected_ids, data.examples[0].rejected_ids]
    for row, response in enumerate(rows):
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == response
        length = int(batch["attention_mask"][row].sum())
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["input_ids"][row, :length][labels[:length] != IGNORE_INDEX],
                           torch.tensor(response))


def test_truncation_keeps_prompt_tail_then_cuts_responses():
    example = truncate_pair(list(range(10)), [20, 21, 22, 23], [30, 31], max_length=9, max_prompt_length=6)
    assert example.prompt_ids == [4, 5, 6, 7, 8, 9]  # the tail of the prompt
    assert example.chosen_ids == [20, 21, 22]  # cut to 9 - 6 tokens
    assert example.rejected_ids == [30, 31]  # already short enough
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate_pair([1], [2], [3], max_length=4, max_prompt_length=4)


def test_long_prompt_keeps_assistant_header(tokenizer):
    pair = PreferencePair(" ".join(["cat"] * 50), "a dog", "a fish")
    example = tokenize_pair(pair, tokenizer, max_length=20, max_prompt_length=8)
    assert len(example.prompt_ids) == 8
    assert example.prompt_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert example.prompt_ids == encode_prompt(tokenizer, pair.prompt)[-8:]


def test_load_reports_file_line_and_field(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good])
    assert load_preference_pairs(path) == [PreferencePair("a", "b", "c")]

    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: missing field 'rejected'"):
        load_preference_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: not valid JSON"):
        load_preference_pairs(path)
    path.write_text(json.dumps({**good, "chosen": 3}) + "\n")
    with pytest.raises(ValueError, match=r"field 'chosen' must be a string"):
        load_preference_pairs(path)
    path.write_text(json.dumps({**good, "score": 1}) + "\n")
    with pytest.raises(ValueError, match=r"unknown field 'score'"):
        load_preference_pairs(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preference_pairs(tmp_path / "missing.jsonl")


def test_tokenization_fingerprint_tracks_what_changes_tokens(tokenizer):
    base = tokenization_fingerprint(tokenizer, 64, 32)
    assert tokenization_fingerprint(make_tokenizer(), 64, 32) == base
    assert tokenization_fingerprint(tokenizer, 65, 32) != base
    assert tokenization_fingerprint(make_tokenizer(extra_tokens=["<m1>"]), 64, 32) != base
    other = make_tokenizer()
    other.chat_template = other.chat_template.replace("<|assistant|> ", "<|assistant|>")
    assert tokenization_fingerprint(other, 64, 32)["chat_template_sha256"] != base["chat_template_sha256"]
