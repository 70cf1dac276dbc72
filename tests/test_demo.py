"""The SPO demos: the pair builder (slots that coexist, the stated conflict rate), the
teacher-forced metric (checked against pyalign eval's independent path), the generation counts,
settings, and both commands end to end on a tiny random model with --quick (structure only: the
scientific result needs the real model)."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pyalign.demo import spo_alpha_sweep, spo_markers
from pyalign.demo.evaluate import TeacherForced, marker_presence, presence_table, slot_format_rate
from pyalign.demo.markers import prompt_bank, split_prompts
from pyalign.demo.spo_data import (
    conflicts_with_earlier, dimension_pairs, marker_tokens, response_properties, slot_response,
)
from pyalign.demo.spo_experiment import merge_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread, and a busy machine stays usable
    yield
    torch.set_num_threads(previous)


def test_prompt_bank_is_large_distinct_and_deterministic():
    prompts = prompt_bank()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    train, held_out = split_prompts(100, 50, seed=3)
    assert (train, held_out) == split_prompts(100, 50, seed=3)
    assert len(train) == 100 and len(held_out) == 50 and not set(train) & set(held_out)
    with pytest.raises(ValueError, match="num_train"):
        split_prompts(len(prompts), 1)


def test_slots_coexist_and_parse_back():
    markers, skips = marker_tokens(4)
    assert markers == ["[Token_1]", "[Token_2]", "[Token_3]", "[Token_4]"] and skips[0] == "[Skip_1]"
    every = slot_response("The sea.", [True] * 4)
    assert every == "[Token_1][Token_2][Token_3][Token_4]The sea."  # one response can have all four
    for properties in ([True, False, True, False], [False] * 4, [True] * 4):
        assert response_properties(slot_response("x", properties), 4) == properties
    # each property has its own position: adding one never moves another
    assert slot_response("x", [False, True, False, False]).index("[Token_2]") == len("[Skip_1]")
    with pytest.raises(ValueError, match="slot 2"):
        response_properties("[Token_1][Token_3]x", 3)
    with pytest.raises(ValueError, match="num_dimensions"):
        marker_tokens(0)


def _pairs(dimension, n=1000, conflict_rate=0.3, other_prob=0.5, seed=0, k=4):
    prompts = [f"prompt {i}" for i in range(n)]
    texts = [f"text {i}" for i in range(n)]
    return dimension_pairs(prompts, texts, dimension, num_dimensions=k, conflict_rate=conflict_rate,
                           other_prob=other_prob, seed=seed, system="sys")


@pytest.mark.parametrize("dimension", [1, 2, 4])
def test_pairs_have_the_stated_conflict_rate_and_the_paper_recipe_elsewhere(dimension):
    pairs = _pairs(dimension)
    conflicting = [p for p in pairs if conflicts_with_earlier(p, dimension, 4)]
    assert len(conflicting) == (0 if dimension == 1 else 300)  # exactly round(0.3 * 1000)
    other_marker_counts, same_side_pairs = [0] * 4, [0] * 4
    for k, pair in enumerate(pairs):
        assert pair["system"] == "sys" and pair["prompt"] == f"prompt {k}"
        assert pair["chosen"].endswith(f"text {k}") and pair["rejected"].endswith(f"text {k}")  # same text
        chosen, rejected = response_properties(pair["chosen"], 4), response_properties(pair["rejected"], 4)
        assert chosen[dimension - 1] and not rejected[dimension - 1]  # the dimension decides the ranking
        for j in range(4):
            if j == dimension - 1:
                continue
            if pair in conflicting and j < dimension - 1:
                assert rejected[j] and not chosen[j]  # dispreferred has every earlier marker, preferred none
            else:
                assert chosen[j] == rejected[j]  # otherwise the same on both sides
                other_marker_counts[j] += chosen[j]
                same_side_pairs[j] += 1
    for j in range(4):
        if j != dimension - 1:
            assert 0.44 < other_marker_counts[j] / same_side_pairs[j] < 0.56  # other_prob 0.5
    assert _pairs(dimension) == pairs and _pairs(dimension, seed=1) != pairs


def test_held_out_pairs_without_conflict_and_bad_arguments():
    assert not any(conflicts_with_earlier(p, 3, 4) for p in _pairs(3, conflict_rate=0.0))
    assert sum(conflicts_with_earlier(p, 2, 4) for p in _pairs(2, n=10, conflict_rate=0.25)) == 2  # round(2.5)
    with pytest.raises(ValueError, match="dimension"):
        _pairs(5)
    with pytest.raises(ValueError, match="conflict_rate"):
        _pairs(2, conflict_rate=1.5)
    with pytest.raises(ValueError, match="other_prob"):
        _pairs(2, other_prob=-0.1)
    with pytest.raises(ValueError, match="texts"):
        dimension_pairs(["p", "q"], ["a"], 1, num_dimensions=2)


def test_marker_presence_format_and_table():
    generations = [[10, 11, 12, 13, 5], [20, 11, 2], [3, 4], [10, 21, 12, 23]]
    result = marker_presence(generations, [10, 11, 12, 13])
    assert result["presence"] == [0.5, 0.5, 0.5, 0.25] and result["pareto"] == 0.25
    # slots in order: row 0 (all markers) and row 3 (markers and skips) are well formed
    assert slot_format_rate(generations, [10, 11, 12, 13], [20, 21, 22, 23]) == 0.5
    first = {"Token_1": 0.5, "Skip_1": 0.125, "end": 0.25}
    table = presence_table({"SPO": {**result, "format": 0.5, "empty": 0.25, "first": first}}, 4)
    assert "| SPO | 50% | 50% | 50% | 25% | 25% | 50% | 25% | 0.50 / 0.12 / 0.25 |" in table
    with pytest.raises(ValueError, match="generations"):
        marker_presence([], [1])


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert spo_markers.main(["--quick", "--out", str(out)]) == 0
    return out


def test_teacher_forced_metric_matches_pyalign_eval_and_flips_with_the_pairs(quick_demo, tmp_path):
    from pyalign.tasks.preference.evaluate import evaluate_model

    base = quick_demo / "base_model"
    policy = quick_demo / "runs" / "spo" / "round_2_dim2" / "model"
    files = [quick_demo / "data" / f"dim{d}.eval.jsonl" for d in (1, 2)]
    metric = TeacherForced(base, files, beta=0.1, max_length=40, max_prompt_length=30)
    rows = metric(policy)
    assert [r["dimension"] for r in rows] == [1, 2] and rows[0]["pairs"] == 8
    independent = evaluate_model(policy, files, ref_dir=base, beta=0.1, max_length=40, max_prompt_length=30,
                                 device="cpu")
    for row, file in zip(rows, files):
        assert row["margin"] == pytest.approx(independent[str(file)]["reward_margin"], abs=1e-5)
        assert row["accuracy"] == pytest.approx(independent[str(file)]["reward_accuracy"])
    assert all(r["margin"] == 0 and r["accuracy"] == 0 for r in metric(base))  # pi_0 against itself

    swapped = tmp_path / "swapped.jsonl"  # preferred and dispreferred exchanged: the margin flips
    records = [json.loads(line) for line in files[1].read_text().splitlines()]
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in records))
    flipped = TeacherForced(base, [swapped], beta=0.1, max_length=40, max_prompt_length=30)(policy)[0]
    assert flipped["margin"] == pytest.approx(-rows[1]["margin"], abs=1e-5)
    assert flipped["accuracy"] == pytest.approx(1 - rows[1]["accuracy"])  # no ties off pi_0


def test_quick_demo_end_to_end(quick_demo):
    result = json.loads((quick_demo / "table4.json").read_text())
    assert result["wall_time_s"] > 0 and set(result["pareto"]) == {"SPO", "S-DPO"}
    assert [(r["method"], r["round"]) for r in result["rounds"]] == [
        (m, i) for m in ("SPO", "S-DPO") for i in range(1, 5)]
    for entry in result["rounds"]:
        assert entry["alpha"] == {"SPO": 0.5, "S-DPO": 0.0}[entry["method"]]
        assert 0 <= entry["empty"] <= 1 and 0 <= entry["format"] <= 1
        assert set(entry["first"]) == {"Token_1", "Skip_1", "end"}
        assert 0 <= sum(entry["first"].values()) <= 1 + 1e-6  # probabilities of three distinct tokens
        assert [d["dimension"] for d in entry["dimensions"]] == [1, 2, 3, 4]
        for d in entry["dimensions"]:
            assert 0 <= d["accuracy"] <= 1 and 0 <= d["presence"] <= 1 and isinstance(d["margin"], float)
    assert result["pareto"]["SPO"] == result["rounds"][3]["pareto"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [o["round"] for o in result["offsets"]["SPO"]] == [2, 3, 4] and "S-DPO" not in result["offsets"]
    # pi_0 is the SFT warm-up's merged model, and every round starts from it
    assert Path(result["base_model_dir"]) == quick_demo / "sft_warmup" / "model"
    assert (quick_demo / "data" / "sft_warmup.jsonl").is_file()
    train_config = json.loads((quick_demo / "train_config.spo.json").read_text())
    assert Path(train_config["model"]["path"]) == quick_demo / "sft_warmup" / "model"
    # round 1 (DPO from pi_0) trained once: S-DPO's is the same file, hard-linked
    spo, sdpo = (quick_demo / "runs" / m / "round_1_dim1" / "model" / "model.safetensors" for m in ("spo", "s_dpo"))
    assert os.path.samefile(spo, sdpo)
    for method in ("spo", "s_dpo"):
        for i in range(2, 5):
            assert (quick_demo / "runs" / method / f"round_{i}_dim{i}" / "model" / "config.json").is_file()


def test_quick_demo_prints_the_tables_and_the_json_path_last(quick_demo, capsys):
    assert spo_markers.main(["--quick", "--out", str(quick_demo)]) == 0  # finished: everything reused
    lines = capsys.readouterr().out.strip().splitlines()
    assert Path(lines[-1]) == quick_demo / "table4.json"
    assert any(line.startswith("| SPO after round 4 |") for line in lines)
    assert any("dim 4 margin (acc.)" in line for line in lines)


def test_quick_alpha_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert spo_alpha_sweep.main(["--quick", "--out", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == out / "alpha_sweep.json"
    result = json.loads((out / "alpha_sweep.json").read_text())
    methods = {r["method"] for r in result["rounds"]}
    assert {"S-DPO (alpha=0)", "SPO alpha=0.1", "SPO alpha=0.3", "SPO alpha=0.5", "SPO alpha=0.7"} < methods
    adaptive = [r for r in result["rounds"] if r.get("adaptive")]
    assert len(adaptive) == 2 and len(adaptive[1]["alpha_trajectory"]) == 8  # 16 pairs / 4, 2 epochs, every step
    assert result["wall_time_s"] > 0 and (out / "alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    for entry in result["rounds"]:
        assert [d["dimension"] for d in entry["dimensions"]] == [1, 2] and entry["round"] in (1, 2)
    # round 1 trained once: every run links the shared one; its fingerprint holds no later alpha
    shared = out / "round1" / "round_1_dim1"
    fingerprint = json.loads((shared / "round_state.json").read_text())["fingerprint"]
    assert fingerprint["alphas"] == [] and "alpha" not in fingerprint["method"] and "adaptive_alpha" not in fingerprint
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6
    for run in runs:
        assert os.path.samefile(run / "round_1_dim1" / "model" / "model.safetensors",
                                shared / "model" / "model.safetensors")


def test_settings_merge_and_errors():
    merged = merge_settings(spo_markers.DEFAULTS, {"data": {"conflict_rate": 0.5}, "training": {"lr": 0.1}})
    assert merged["data"]["conflict_rate"] == 0.5 and merged["training"]["lr"] == 0.1
    with pytest.raises(ValueError, match="data.unknown"):
        merge_settings(spo_markers.DEFAULTS, {"data": {"unknown": 1}})
    with pytest.raises(ValueError, match="model"):
        merge_settings(spo_markers.DEFAULTS, {"model": "gpt"})


@pytest.mark.parametrize("name, defaults", [
    ("spo_demo.yaml", spo_markers.DEFAULTS), ("spo_demo_quick.yaml", spo_markers.QUICK),
    ("spo_demo_alpha_sweep.yaml", spo_alpha_sweep.DEFAULTS),
])
def test_config_files_mirror_the_built_in_settings(name, defaults):
    with open(REPO / "configs" / name, encoding="utf-8") as handle:
        assert yaml.safe_load(handle) == defaults


def test_offset_line_names_kappas_and_handles_a_round_without_conflicts():
    from pyalign.demo.spo_experiment import describe_offsets

    line = describe_offsets({"round": 2, "kappas": [-0.01, 0.1], "pairs": 64, "conflicting_pairs": 19,
                             "mean_offset_conflicting": 0.87, "mean_offset_others": -0.02})
    assert line == ("round 2 (kappas -0.01, +0.1): mean offset +0.87 on the 19 conflicting pairs, -0.02 "
                    "on the other 45")
    none = describe_offsets({"round": 2, "kappas": [-0.07, 0.1], "pairs": 64, "conflicting_pairs": 0,
                             "mean_offset_conflicting": None, "mean_offset_others": -0.3})
    assert "mean offset - on the 0 conflicting pairs, -0.30 on the other 64" in none


def test_warmup_examples_write_every_slot_pattern_behind_each_text():
    from pyalign.demo.spo_experiment import warmup_examples

    prompts, texts = [f"prompt {i}" for i in range(200)], [f"text {i}" for i in range(200)]
    records = warmup_examples(prompts, texts, 4, 2, seed=0)
    assert records == warmup_examples(prompts, texts, 4, 2, seed=0)  # seeded
    assert len(records) == 400 and [r["prompt"] for r in records[:4]] == ["prompt 0"] * 2 + ["prompt 1"] * 2
    slots = [response_properties(r["response"], 4) for r in records]  # every response has the 4 slots, in order
    assert all(r["response"].endswith(r["prompt"].replace("prompt", "text")) for r in records)
    for d in range(4):  # each slot holds [Token_d] about half the time
        assert 0.4 < sum(s[d] for s in slots) / len(slots) < 0.6
    assert len({tuple(s) for s in slots}) == 16
