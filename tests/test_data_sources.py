"""pyalign.data sources and adapters on small files in the real schemas of the hub data sets
(tests/fixtures/data, written by tests/fixtures/make_fixtures.py): every mapping checked value by
value, every format datasets reads, bad rows, fingerprints, config checks, relabeling."""

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from helpers_tiny_lm import make_tokenizer, write_jsonl
from pyalign.data import (
    TOKENIZATION_VERSION, BadRowError, DataSource, PreferencePair, check_data_source, encode_prompt,
    file_fingerprint, fingerprint, load_pairs, load_ratings, load_source, tokenize_pair,
)
from pyalign.data.adapters import guess_schema, parse_helpsteer_prompt, parse_hh_dialogue
from pyalign.data.pairs import RowError
from pyalign.data.relabel import reward_augmented, target_system_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_fixtures", Path(__file__).parent / "fixtures" / "make_fixtures.py")
FX = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FX)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets writes its Arrow cache under the test's tmp folder, not the user's."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def test_fixture_files_are_what_the_generator_writes():
    for name, data in FX.files().items():
        assert (FIXTURES / name).read_bytes() == data, name
        assert (REPO / "configs" / "data" / "samples" / name).read_bytes() == data, name


# ----------------------------------------------------------------------------- each schema

def test_pku_saferlhf_one_pair_stream_per_dimension():
    train = FX.PKU_TRAIN
    for dimension, id_field in (("helpful", "better_response_id"), ("harmless", "safer_response_id")):
        pairs = load_pairs({"path": str(FIXTURES / "pku_saferlhf"), "dimension": dimension})
        assert len(pairs) == len(train)
        for pair, row in zip(pairs, train):
            best = row[id_field]
            assert pair == PreferencePair(row["prompt"], row[f"response_{best}"], row[f"response_{1 - best}"])
    # the two streams disagree where the more helpful answer is the unsafe one
    helpful = load_pairs({"path": str(FIXTURES / "pku_saferlhf"), "dimension": "better"})
    harmless = load_pairs({"path": str(FIXTURES / "pku_saferlhf"), "dimension": "safer"})
    assert helpful[0].chosen == harmless[0].rejected
    # the README's configs and splits work on the local copy of the hub repository
    test = load_pairs({"path": str(FIXTURES / "pku_saferlhf"), "config": "alpaca-7b", "split": "test",
                       "dimension": "harmless"})
    assert [p.prompt for p in test] == [r["prompt"] for r in FX.PKU_TEST]


def test_helpsteer2_pairs_per_attribute_and_rating_records():
    pairs = load_pairs({"path": str(FIXTURES / "helpsteer2"), "dimension": "helpfulness"})
    rows = FX.HELPSTEER_TRAIN
    # prompts 0/1 (4 vs 1), 4/5 (4 vs 1), 6/7 (4 vs 3); 2/3 tie at 3 and make no pair
    assert [(p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        (rows[0]["response"], rows[1]["response"], 4.0, 1.0),
        (rows[4]["response"], rows[5]["response"], 4.0, 1.0),
        (rows[6]["response"], rows[7]["response"], 4.0, 3.0),
    ]
    # the multi-turn prompt becomes chat messages, not text with <extra_id_1> separators
    assert pairs[1].prompt == (
        {"role": "user", "content": "I want to plan a picnic."},
        {"role": "assistant", "content": "Great idea! Where would you like to have it?"},
        {"role": "user", "content": "In a park near a lake. What should I bring?"},
    )
    verbosity = load_pairs({"path": str(FIXTURES / "helpsteer2"), "dimension": "verbosity"})
    assert verbosity[0].chosen == rows[1]["response"]  # the long wrong answer is the more verbose one
    assert len(verbosity) == 3  # the water-cycle answers tie on verbosity
    records = load_ratings(str(FIXTURES / "helpsteer2"))
    assert len(records) == len(rows)
    attributes = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    assert records[0].ratings == {k: rows[0][k] for k in attributes}
    assert records[4].prompt == pairs[1].prompt and records[4].response == rows[4]["response"]
    validation = load_ratings({"path": str(FIXTURES / "helpsteer2"), "split": "validation"})
    assert [r.response for r in validation] == [r["response"] for r in FX.HELPSTEER_VALIDATION]


def test_ultrafeedback_binarized_from_parquet():
    pairs = load_pairs({"path": str(FIXTURES / "ultrafeedback_binarized"), "split": "train_prefs"})
    assert [(p.prompt, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        (r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"], r["score_chosen"], r["score_rejected"])
        for r in FX.UF_TRAIN
    ]
    test = load_source({"path": str(FIXTURES / "ultrafeedback_binarized"), "split": "test_prefs"})
    assert test.report.schema == "ultrafeedback" and len(test.pairs) == 2


def test_hh_rlhf_shared_prefix_is_the_prompt_and_multi_turn_stays_messages():
    pairs = load_pairs({"path": str(FIXTURES / "hh_rlhf"), "data_dir": "helpful-base"})
    assert pairs[0] == PreferencePair("What's a good name for a goldfish?",
                                      "How about Bubbles, Goldie or Captain Fin?", "I don't know.")
    assert pairs[1].prompt == (
        {"role": "user", "content": "How do I make rice fluffy?"},
        {"role": "assistant", "content": "What kind of rice are you cooking?"},
        {"role": "user", "content": "Basmati."},
    )
    assert pairs[1].rejected == "Just cook it longer."
    test = load_pairs({"path": str(FIXTURES / "hh_rlhf"), "data_dir": "harmless-base", "split": "test"})
    assert test[0].chosen.startswith("I'd rather help you study")
    # a single .jsonl.gz file of the data set reads the same
    assert load_pairs(str(FIXTURES / "hh_rlhf" / "helpful-base" / "train.jsonl.gz")) == pairs


def test_hh_dialogue_parsing_edges():
    assert parse_hh_dialogue("\n\nHuman: hi\n\nthere\n\nAssistant: ", "chosen") == [
        {"role": "user", "content": "hi\n\nthere"}, {"role": "assistant", "content": ""}]
    with pytest.raises(RowError, match="must start with"):
        parse_hh_dialogue("hello\n\nAssistant: x", "chosen")
    assert parse_helpsteer_prompt("just one turn") == "just one turn"


def test_chat_message_rows_in_every_form():
    pairs = load_pairs(str(FIXTURES / "chat_messages.jsonl"))
    assert pairs[0] == PreferencePair("What is the capital of Italy?", "Rome.", "Milan.",
                                      system="You are a concise assistant.")
    assert len(pairs[1].prompt) == 3 and pairs[1].prompt[-1]["role"] == "user"
    assert pairs[1].chosen.startswith("Adult cats")
    assert pairs[2] == PreferencePair("Name a primary colour.", "Red.", "Green.")
    assert pairs[3] == PreferencePair("Spell 'necessary'.", "N-E-C-E-S-S-A-R-Y.", "N-E-S-E-S-A-R-Y.",
                                      chosen_score=9.0, rejected_score=2.0)


def test_schema_is_guessed_from_columns_and_can_be_named():
    cases = {
        "pku_saferlhf": FX.PKU_TRAIN[0], "helpsteer2": FX.HELPSTEER_TRAIN[0], "ultrafeedback": FX.UF_TRAIN[0],
        "hh_rlhf": FX.HH["helpful-base"]["train"][0], "messages": FX.MESSAGES[1],
        "pairs": {"prompt": "a", "chosen": "b", "rejected": "c"},
        "ratings": {"prompt": "a", "response": "b", "ratings": {"x": 1}},
    }
    for schema, row in cases.items():
        assert guess_schema(row, row) == schema
    with pytest.raises(ValueError, match="cannot tell the schema.*name it with schema"):
        guess_schema(["text", "label"], {"text": "a", "label": 1})
    # a pairs file read as messages gives the same pairs
    plain = REPO / "configs" / "data" / "helpful_train.jsonl"
    assert load_pairs({"path": str(plain), "schema": "messages"}) == load_pairs(str(plain))


# ----------------------------------------------------------------------------- formats and errors

def test_every_format_datasets_reads(tmp_path):
    import datasets

    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    expected = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    data = datasets.Dataset.from_list(rows)
    data.to_csv(tmp_path / "pairs.csv", index=False)
    data.to_csv(tmp_path / "pairs.tsv", index=False, sep="\t")
    data.to_parquet(tmp_path / "pairs.parquet")
    data.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(tmp_path / "saved_dict")
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for source in ("pairs.csv", "pairs.tsv", "pairs.parquet", "saved", "saved_dict", "pairs.json", "pairs.jsonl.gz", arrow_file):
        assert load_pairs(str(tmp_path / source)) == expected, source
    assert len(load_pairs({"path": str(tmp_path / "saved_dict"), "split": "test"})) == 1
    with pytest.raises(ValueError, match="no split 'dev'.*train, test"):
        load_pairs({"path": str(tmp_path / "saved_dict"), "split": "dev"})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown file type"):
        load_pairs(str(tmp_path / "notes.txt"))


def test_bad_rows_fail_with_index_and_field_or_are_skipped(tmp_path, caplog):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, {"prompt": "a", "chosen": 3, "rejected": "c"}, good])
    with pytest.raises(BadRowError, match=r"pairs.jsonl:3 \(row 2\): field 'chosen' must be a string") as error:
        load_pairs(str(path))
    assert (error.value.index, error.value.field) == (2, "chosen")
    loaded = load_source({"path": str(path), "on_bad_row": "skip"})
    assert len(loaded.pairs) == 3 and loaded.report.skipped[0][:2] == (2, "chosen")
    assert "skipped 1 bad row" in caplog.text

    # rows read through datasets: the row index and the field
    rows = [dict(FX.PKU_TRAIN[0]), dict(FX.PKU_TRAIN[1], better_response_id=2), dict(FX.PKU_TRAIN[2])]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "pku.parquet")
    with pytest.raises(BadRowError, match=r"pku.parquet row 1: field 'better_response_id' must be 0 or 1, got 2"):
        load_pairs({"path": str(tmp_path / "pku.parquet"), "dimension": "helpful"})
    assert len(load_pairs({"path": str(tmp_path / "pku.parquet"), "dimension": "helpful", "on_bad_row": "skip"})) == 2
    # harmless only reads safer_response_id, so the same row is fine there
    assert len(load_pairs({"path": str(tmp_path / "pku.parquet"), "dimension": "harmless"})) == 3

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
         "chosen": "a", "rejected": "b"},
    ])
    with pytest.raises(BadRowError, match=r"row 1\): field 'messages' must end with the user's turn"):
        load_pairs(str(chat))
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                                               "rejected": "\n\nHuman: a\n\nAssistant: b"}])
    with pytest.raises(BadRowError, match="the same conversation"):
        load_pairs({"path": str(hh), "schema": "hh_rlhf"})


def test_source_checks_name_the_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert check_data_source("rounds[0].train", str(path)) == str(path)  # a path stays a path
    source = check_data_source("rounds[0].train", {"path": str(path), "schema": "pairs"})
    assert isinstance(source, DataSource) and source.path == str(path)
    hub = check_data_source("r", {"name": "PKU-Alignment/PKU-SafeRLHF", "schema": "pku", "dimension": "safer"})
    assert (hub.schema, hub.dimension, hub.split) == ("pku_saferlhf", "harmless", "train")
    bad = {
        "r: file not found": str(tmp_path / "missing.jsonl"),
        r"r.shema: unknown field": {"path": str(path), "shema": "pairs"},
        "r: give exactly one of path": {"path": str(path), "name": "a/b"},
        "r.schema: expected one of": {"path": str(path), "schema": "nope"},
        "r.dimension: expected one of helpful, harmless": {"name": "a/b", "schema": "pku_saferlhf", "dimension": "x"},
        "r.dimension: the pku_saferlhf schema has one pair stream per dimension": {"name": "a/b", "schema": "pku_saferlhf"},
        "r.on_bad_row: expected fail or skip": {"path": str(path), "on_bad_row": "ignore"},
        "r.relabel: expected one of reward_augmented": {"path": str(path), "relabel": "other"},
        "r.relabel.score_range: expected": {"path": str(path), "relabel": {"method": "reward_augmented",
                                                                            "score_range": [5, 1]}},
        "r.limit: expected a positive integer": {"path": str(path), "limit": 0},
        "r.name: expected a hub data set name": {"name": "not a name!"},
    }
    for message, value in bad.items():
        with pytest.raises(ValueError, match=message):
            check_data_source("r", value)


def test_limit_reads_the_first_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [p.prompt for p in load_pairs({"path": str(path), "limit": 2})] == ["q0", "q1"]
    assert len(load_pairs({"path": str(FIXTURES / "ultrafeedback_binarized"), "split": "train_prefs", "limit": 3})) == 3


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprint_is_of_the_data_loaded(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # a plain JSONL file of pairs keeps its old key (the file's bytes): old caches stay valid
    assert fingerprint(str(path)) == file_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    write_jsonl(path, rows[:1])  # changed file -> re-read, new key
    assert fingerprint(str(path)) == file_fingerprint(path) and len(load_pairs(str(path))) == 1

    source = {"path": str(FIXTURES / "helpsteer2"), "dimension": "helpfulness"}
    key = fingerprint(source)
    assert key.startswith("pairs-sha256:")
    assert fingerprint(dict(source, dimension="verbosity")) != key  # other pairs, other key
    assert fingerprint(dict(source, relabel="reward_augmented")) != key
    # the same pairs from another file and schema give the same key
    ultrafeedback = {"path": str(FIXTURES / "ultrafeedback_binarized"), "split": "train_prefs"}
    pairs_file = tmp_path / "same.parquet"
    import datasets

    datasets.Dataset.from_list([p.to_record() for p in load_pairs(ultrafeedback)]).to_parquet(pairs_file)
    assert fingerprint({"path": str(pairs_file), "schema": "pairs"}) == fingerprint(ultrafeedback)


# ----------------------------------------------------------------------------- tokenisation

def test_multi_turn_prompts_go_through_the_chat_template_as_messages():
    tokenizer = make_tokenizer()
    messages = ({"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
                {"role": "user", "content": "why is the sky blue"})
    ids = encode_prompt(tokenizer, messages, system="be good")
    text = "<|system|> be good <|user|> the cat <|assistant|> a dog <|user|> why is the sky blue <|assistant|> "
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # text prompts tokenise exactly as before messages existed (so TOKENIZATION_VERSION stays 1)
    assert TOKENIZATION_VERSION == 1
    assert encode_prompt(tokenizer, "why is the sky blue", "be good") == tokenizer(
        "<|system|> be good <|user|> why is the sky blue <|assistant|> ", add_special_tokens=False)["input_ids"]
    # a one-message conversation is stored as text, so it is the same pair and the same tokens
    one = load_pairs(str(FIXTURES / "chat_messages.jsonl"))[2]
    assert one.prompt == "Name a primary colour." and isinstance(one.prompt, str)
    example = tokenize_pair(PreferencePair(messages, "a fish", "a bird", "be good"), tokenizer, 64, 8)
    assert example.prompt_ids == ids[-8:]  # the tail of the conversation, ending with the assistant header


def test_pairs_round_trip_through_pyalign_jsonl(tmp_path):
    from pyalign.data import write_preference_pairs

    original = load_pairs({"path": str(FIXTURES / "hh_rlhf"), "data_dir": "helpful-base"}) + \
        load_pairs(str(FIXTURES / "chat_messages.jsonl"))
    write_preference_pairs(tmp_path / "out.jsonl", original)
    assert load_pairs(str(tmp_path / "out.jsonl")) == original


# ----------------------------------------------------------------------------- relabeling

def test_reward_augmented_relabeling():
    pairs = load_pairs({"path": str(FIXTURES / "ultrafeedback_binarized"), "split": "train_prefs",
                        "relabel": "reward_augmented"})
    scored = [r for r in FX.UF_TRAIN if r["score_chosen"] != r["score_rejected"]]  # the tie is dropped
    assert len(pairs) == 2 * len(scored) == 6
    for k, row in enumerate(scored):
        up, down = pairs[2 * k], pairs[2 * k + 1]
        good, bad = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert (up.chosen, up.rejected, down.chosen, down.rejected) == (good, bad, bad, good)
        assert up.system == target_system_prompt(row["score_chosen"], score_range=(1, 10))
        assert down.system == target_system_prompt(row["score_rejected"], score_range=(1, 10))
    assert pairs[2].system == (
        "You are an assistant that generates responses for the instruction while implicitly achieving the "
        "following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: 8.5.")
    helpsteer = load_pairs({"path": str(FIXTURES / "helpsteer2"), "dimension": "correctness",
                            "relabel": {"method": "reward_augmented", "score_name": "Correctness"}})
    assert helpsteer[0].system.endswith("(on a scale of 0-4, where 0 is lowest and 4 is highest):\nCorrectness score: 4.")
    # an existing system prompt is kept after the target
    kept, ties = reward_augmented([PreferencePair("q", "a", "b", "Be brief.", 2.0, 1.0)], score_range=None)
    assert ties == 0 and kept[0].system.endswith("Overall score: 2.\n\nBe brief.")
    with pytest.raises(ValueError, match="needs chosen_score and rejected_score"):
        load_pairs({"path": str(FIXTURES / "pku_saferlhf"), "dimension": "helpful", "relabel": "reward_augmented"})
