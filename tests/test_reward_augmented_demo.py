"""The reward-augmented demo: the scored pairs (a top-graded chosen answer, a lower-graded rejected
one, many rejected answers correct), their relabeling as the trainer reads it, the measurement
files, and the command end to end on a tiny random model with --quick."""

import json

import pytest

from helpers_tiny_lm import one_thread
from pyalign.data import PreferenceDataset
from pyalign.data.relabel import target_system_prompt
from pyalign.demo import reward_augmented
from pyalign.demo.checkable import SYSTEM, grade, split_tasks
from pyalign.demo.reward_augmented import condition_system, measurement_files, scored_pairs


single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _pairs(count=60):
    tasks, _ = split_tasks(count, 1, seed=0)
    # long correct answers (7) for every third question, short wrong ones otherwise
    samples = [[f"Let me think about this question for a while and then say {t.answer} as the final result",
                "I am not sure."] if i % 3 == 0 else ["Maybe 1000.", "No idea."] for i, t in enumerate(tasks)]
    return tasks, scored_pairs(tasks, samples, seed=0)


def test_scored_pairs_prefer_the_higher_grade_and_many_rejected_answers_are_good():
    tasks, pairs = _pairs()
    assert pairs
    for pair in pairs:
        task = tasks[pair["meta"]["index"]]
        assert pair["chosen_score"] == grade(task, pair["chosen"]) > pair["rejected_score"] == grade(task, pair["rejected"])
        assert pair["chosen_score"] == 10 and pair["system"] == SYSTEM
    assert sum(p["rejected_score"] >= 7 for p in pairs) >= len(pairs) // 10
    assert scored_pairs(tasks, [["a", "b"]] * len(tasks), seed=0) == scored_pairs(tasks, [["a", "b"]] * len(tasks), seed=0)


def test_relabeling_as_the_trainer_reads_it_and_the_measurement_files(tmp_path):
    from pyalign.demo.tiny_model import make_tokenizer

    _, pairs = _pairs(12)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = make_tokenizer()
    source = {"path": str(path), "relabel": {"method": "reward_augmented", "score_range": [1, 10]}}
    relabelled = PreferenceDataset.from_source(source, tokenizer, 512, 256)
    assert len(relabelled) == 2 * len(pairs)
    plain = PreferenceDataset.from_source(str(path), tokenizer, 512, 256)
    assert len(plain) == len(pairs)
    assert condition_system(10) == target_system_prompt(10, score_range=(1, 10)) + "\n\n" + SYSTEM
    assert "score: 10." in condition_system(10) and "1-10" in condition_system(10) and condition_system(None) == SYSTEM
    files = measurement_files(pairs, tmp_path)
    own = [json.loads(line) for line in files["own"].read_text().splitlines()]
    top = [json.loads(line) for line in files["top"].read_text().splitlines()]
    for pair, o, t in zip(pairs, own, top):
        assert o["chosen"] == t["chosen"] == pair["rejected"]
        assert o["system"] == condition_system(int(pair["rejected_score"])) and t["system"] == condition_system(10)


def test_quick_demo_end_to_end_writes_the_json_contract(tmp_path, capsys):
    out = tmp_path / "ra"
    assert reward_augmented.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "reward_augmented.json")
    result = json.loads((out / "reward_augmented.json").read_text())
    assert [(r["method"], r["condition"]) for r in result["runs"]] == [
        ("base", None), ("base", "top"), ("dpo", None), ("dpo_reward_augmented", "top"), ("dpo_reward_augmented", "low")]
    for row in result["runs"]:
        assert row["score_ci"][0] <= row["score"] <= row["score_ci"][1]
        assert 0 <= row["accuracy"] <= 1
    assert set(result["unlearning"]) == {"dpo", "dpo_reward_augmented"} and result["wall_time_s"] > 0
