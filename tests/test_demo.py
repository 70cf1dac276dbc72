"""The SPO demonstrative experiment: data recipe, marker presence, settings, and the --quick run
end to end on a tiny random model (structure only; the scientific result needs the real model)."""

import json
from pathlib import Path

import pytest
import yaml

from pyalign.demo import markers as demo_markers
from pyalign.demo import spo_markers
from pyalign.demo.evaluate import marker_presence, table_markdown
from pyalign.demo.markers import MARKERS, dimension_pairs, prompt_bank, split_prompts, with_markers

REPO = Path(__file__).resolve().parents[1]


def test_prompt_bank_is_large_distinct_and_deterministic():
    prompts = prompt_bank()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert prompt_bank() == prompts
    train, held_out = split_prompts(100, 50, seed=3)
    assert (train, held_out) == split_prompts(100, 50, seed=3)
    assert len(train) == 100 and len(held_out) == 50 and not set(train) & set(held_out)
    assert split_prompts(100, 50, seed=4)[0] != train
    with pytest.raises(ValueError, match="num_train"):
        split_prompts(len(prompts), 1)


def _pairs(n=4000, dimension=2, seed=0, per_prompt=1, other_markers="both"):
    prompts = [f"prompt {i}" for i in range(n)]
    responses = [[f"first {i}", f"second {i}"][:per_prompt] for i in range(n)]
    pairs = dimension_pairs(prompts, responses, dimension, seed=seed, system="sys", other_markers=other_markers)
    return pairs, responses


def _text_and_markers(response):
    present = [m for m in MARKERS if m in response]
    text = response.split("]")[-1]
    assert response == with_markers(text, present)  # markers at the start, in ascending order
    return text, present


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_dimension_pairs_follow_the_paper_recipe(per_prompt):
    pairs, responses = _pairs(per_prompt=per_prompt)
    own, others = MARKERS[2], [m for m in MARKERS if m != MARKERS[2]]
    first_chosen = 0
    other_counts = dict.fromkeys(others, 0)
    for pair, texts in zip(pairs, responses):
        assert pair["system"] == "sys"
        chosen_text, chosen_markers = _text_and_markers(pair["chosen"])
        rejected_text, rejected_markers = _text_and_markers(pair["rejected"])
        assert own in chosen_markers and own not in rejected_markers
        assert sorted({chosen_text, rejected_text}) == sorted(set(texts))  # one text: the same on both sides
        first_chosen += chosen_text == texts[0]
        assert set(chosen_markers) - {own} == set(rejected_markers)  # others: in both or in neither
        for marker in rejected_markers:
            other_counts[marker] += 1
    if per_prompt == 2:  # a fair coin decides which sample is preferred
        assert 0.45 < first_chosen / len(pairs) < 0.55
    for marker, count in other_counts.items():
        assert 0.08 < count / len(pairs) < 0.12, marker
    assert _pairs(per_prompt=per_prompt)[0] == pairs and _pairs(seed=1, per_prompt=per_prompt)[0] != pairs


def test_dimension_pairs_independent_other_markers():
    pairs, _ = _pairs(other_markers="independent")
    marker = MARKERS[0]
    in_chosen = sum(marker in p["chosen"] for p in pairs) / len(pairs)
    in_rejected = sum(marker in p["rejected"] for p in pairs) / len(pairs)
    only_one = sum((marker in p["chosen"]) != (marker in p["rejected"]) for p in pairs) / len(pairs)
    assert 0.08 < in_chosen < 0.12 and 0.08 < in_rejected < 0.12
    assert 0.14 < only_one < 0.22  # 2 * 0.1 * 0.9 = 0.18: the sides differ


def test_dimension_pairs_reject_bad_arguments():
    with pytest.raises(ValueError, match="dimension"):
        dimension_pairs(["p"], [["a", "b"]], 4)
    with pytest.raises(ValueError, match="other_prob"):
        dimension_pairs(["p"], [["a", "b"]], 0, other_prob=1.5)
    with pytest.raises(ValueError, match="responses"):
        dimension_pairs(["p", "q"], [["a", "b"]], 0)
    with pytest.raises(ValueError, match="responses"):
        dimension_pairs(["p"], [["a", "b", "c"]], 0)
    with pytest.raises(ValueError, match="other_markers"):
        dimension_pairs(["p"], [["a"]], 0, other_markers="some")


def test_marker_presence_and_table():
    generations = [[5, 10, 11, 12, 13], [10, 1, 2], [3, 4], [13, 12, 11, 10]]
    result = marker_presence(generations, [10, 11, 12, 13])
    assert result["presence"] == [0.75, 0.5, 0.5, 0.5]
    assert result["pareto"] == 0.5 and result["num_generations"] == 4
    table = table_markdown({"SPO": result}, ["a", "b", "c", "d"])
    assert "| SPO | 75.0% | 50.0% | 50.0% | 50.0% | 50.0% |" in table
    with pytest.raises(ValueError, match="generations"):
        marker_presence([], [1])


def test_sampled_responses_are_cached(tmp_path, monkeypatch):
    from pyalign.demo.tiny_model import save_tiny_chat_model
    from pyalign.models import load_model_and_tokenizer

    folder = save_tiny_chat_model(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(folder)
    settings = demo_markers.SamplingSettings(num_per_prompt=2, max_new_tokens=4, batch_size=3)
    prompts = prompt_bank()[:5]
    model_id = demo_markers.model_fingerprint(folder)
    first = demo_markers.sample_responses(model, tokenizer, prompts, settings, model_id=model_id, cache_dir=tmp_path / "c")
    assert len(first) == 5 and all(len(r) == 2 and all(isinstance(t, str) for t in r) for r in first)
    assert len(list((tmp_path / "c").glob("responses-*.json"))) == 1

    monkeypatch.setattr(demo_markers, "generate", lambda *a, **k: pytest.fail("cache miss"))
    again = demo_markers.sample_responses(model, tokenizer, prompts, settings, model_id=model_id, cache_dir=tmp_path / "c")
    assert again == first


def test_settings_merge_and_errors():
    merged = spo_markers.merge_settings(spo_markers.FULL, {"data": {"num_train_prompts": 10}, "training": {"lr": 0.1}})
    assert merged["data"]["num_train_prompts"] == 10 and merged["training"]["lr"] == 0.1
    assert merged["data"]["num_eval_prompts"] == spo_markers.FULL["data"]["num_eval_prompts"]
    with pytest.raises(ValueError, match="data.unknown"):
        spo_markers.merge_settings(spo_markers.FULL, {"data": {"unknown": 1}})
    with pytest.raises(ValueError, match="model"):
        spo_markers.merge_settings(spo_markers.FULL, {"model": "gpt"})


@pytest.mark.parametrize("name, defaults", [("spo_demo.yaml", spo_markers.FULL), ("spo_demo_quick.yaml", spo_markers.QUICK)])
def test_config_files_mirror_the_built_in_settings(name, defaults):
    with open(REPO / "configs" / name, encoding="utf-8") as handle:
        assert yaml.safe_load(handle) == defaults


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert spo_markers.main(["--quick", "--out", str(tmp_path / "demo")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    json_path = Path(lines[-1])
    assert json_path == tmp_path / "demo" / "table4.json" and json_path.is_file()
    result = json.loads(json_path.read_text())

    assert set(result["table"]) == {"SPO", "S-DPO"}
    for row in result["table"].values():
        assert list(row["presence"]) == list(MARKERS)
        assert all(0.0 <= p <= 1.0 for p in row["presence"].values())
        assert 0.0 <= row["pareto"] <= min(row["presence"].values())
    for rounds in result["per_round"].values():
        assert len(rounds) == len(MARKERS)
    assert result["per_round"]["SPO"][-1]["presence"] == result["table"]["SPO"]["presence"]
    assert result["timings_s"]["total"] > 0
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("| SPO |") for line in lines)
    for method in ("spo", "s_dpo"):  # every round produced an HF model folder
        for i in range(1, 5):
            assert (tmp_path / "demo" / "runs" / method / f"round_{i}_token_{i}" / "model" / "config.json").is_file()
