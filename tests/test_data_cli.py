"""``pyalign data inspect``: the first records as pyalign sees them, and the --json contract."""

import json
from pathlib import Path

import pytest

from helpers_tiny_lm import make_tokenizer, write_jsonl
from pyalign.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(folder)
    return folder


def inspect(capsys, *args):
    status = main(["data", "inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_records_have_exactly_the_contract_keys(capsys):
    status, out, _ = inspect(capsys, FIXTURES / "hh_rlhf", "--data-dir", "helpful-base", "--json", "--limit", "2")
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2 and all(set(r) == {"prompt", "chosen", "rejected", "system"} for r in records)
    assert records[0] == {"prompt": "What's a good name for a goldfish?", "chosen": "How about Bubbles, Goldie or "
                          "Captain Fin?", "rejected": "I don't know.", "system": None}
    assert records[1]["prompt"] == [{"role": "user", "content": "How do I make rice fluffy?"},
                                    {"role": "assistant", "content": "What kind of rice are you cooking?"},
                                    {"role": "user", "content": "Basmati."}]
    status, out, _ = inspect(capsys, FIXTURES / "ultrafeedback_binarized", "--split", "train_prefs",
                             "--relabel", "reward_augmented", "--json", "--limit", "2")
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["system"].endswith("Overall score: 9.") and second["system"].endswith("Overall score: 3.")
    assert (first["chosen"], first["rejected"]) == (second["rejected"], second["chosen"])


def test_text_view_is_the_chat_template_and_the_tokens(capsys, tokenizer_dir):
    status, out, err = inspect(capsys, FIXTURES / "pku_saferlhf", "--model", tokenizer_dir, "--limit", "1")
    assert status == 0
    assert "showing helpful (choose with --dimension)" in err  # the first dimension, said so
    assert "=== record 1 (row 0; schema pku_saferlhf, dimension helpful) ===" in out
    # the tiny tokenizer knows few of these words: what trains is <unk>s inside the chat template
    assert "--- prompt (" in out and "<|user|>" in out and "<|assistant|>" in out
    assert "--- chosen (" in out and "<eos>" in out
    status, out, err = inspect(capsys, FIXTURES / "pku_saferlhf", "--dimension", "harmless", "--model", tokenizer_dir,
                               "--max-length", "12", "--max-prompt-length", "8", "--limit", "1")
    assert "--- prompt (8 tokens, truncated) ---" in out and "showing" not in err
    status, out, _ = inspect(capsys, FIXTURES / "helpsteer2", "--dimension", "correctness", "--model", tokenizer_dir,
                             "--limit", "1")
    assert "scores: chosen 4, rejected 0" in out


def test_errors_exit_2_and_name_the_problem(capsys, tmp_path, monkeypatch):
    status, _, err = inspect(capsys, FIXTURES / "chat_messages.jsonl", "--schema", "pku_saferlhf", "--json",
                             "--dimension", "helpful")
    assert status == 2 and "chat_messages.jsonl:1 (row 0): missing field 'prompt'" in err
    table = write_jsonl(tmp_path / "table.jsonl", [{"text": "a", "label": 1}])
    status, _, err = inspect(capsys, table, "--json")
    assert status == 2 and "cannot tell the schema from the columns ['label', 'text']" in err
    status, _, err = inspect(capsys, tmp_path / "nope.jsonl", "--json")
    assert status == 2 and "no such file or folder" in err

    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    status, _, err = inspect(capsys, "Anthropic/hh-rlhf", "--json")
    assert status == 2 and "data set Anthropic/hh-rlhf: not in the local datasets cache" in err
    status, _, err = inspect(capsys, FIXTURES / "chat_messages.jsonl", "--schema", "pku_saferlhf", "--json",
                             "--dimension", "helpful", "--on-bad-row", "skip")
    assert status == 2 and "no preference pairs" in err


def test_export_writes_pyalign_jsonl_that_loads_back(capsys, tmp_path):
    from pyalign.data import load_pairs, load_ratings

    source = FIXTURES / "helpsteer2"
    assert main(["data", "export", str(source), "--ratings", "--out", str(tmp_path / "ratings.jsonl")]) == 0
    assert load_ratings(str(tmp_path / "ratings.jsonl")) == load_ratings(str(source))
    assert main(["data", "export", str(source), "--dimension", "coherence", "--out", str(tmp_path / "pairs.jsonl")]) == 0
    assert load_pairs(str(tmp_path / "pairs.jsonl")) == load_pairs({"path": str(source), "dimension": "coherence"})
    assert "wrote 8 rating records" in capsys.readouterr().out
