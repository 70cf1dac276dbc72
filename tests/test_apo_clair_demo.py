"""The APO/CLAIR demo: the checkable bank's reviser, reference answers and grades, the statistics,
the program reviser inside pyalign's CLAIR pipeline, the data-set builders, and the command end to
end on a tiny random model with --quick (structure only: the result needs the real model)."""

import json
import math

import pytest

from helpers_tiny_lm import one_thread
from pyalign.data.clair import ClairSettings, ProgramReviser, make_clair_pairs
from pyalign.demo import apo_clair
from pyalign.demo.apo_clair_data import dataset_stats, judge_pairs, stronger_pairs
from pyalign.demo.checkable import (
    edit_distance, grade, reference_answer, revise_answer, split_tasks, t_interval, wilson_interval,
)
from pyalign.demo.dpa_tasks import Task, is_correct, make_tasks


single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


ADD = Task("What is 12 + 19?", "31", "arithmetic")
UNITS = Task("How many minutes are in 3 hours?", "180", "units")
CAPITAL = Task("What is the capital of the United States?", "Washington", "capitals")


@pytest.mark.parametrize("task, wrong, expected", [
    (ADD, "12 + 19 = 22\n\nThis is a classic example.", "12 + 19 = 31\n\nThis is a classic example."),
    (UNITS, "3 hours is 3 * 60 = 1,800 minutes.", "3 hours is 3 * 60 = 180 minutes."),
    (UNITS, "To convert, multiply: 3 * 60 =", "To convert, multiply: 3 * 60 = 180"),
    (ADD, "To add these numbers, we line them up", "To add these numbers, we line them up The answer is 31."),
    (CAPITAL, "The capital of the United States is New York City.", "The capital of the United States is Washington."),
    (CAPITAL, "It is a large city.", "It is a large city. The capital of the United States is Washington."),
])
def test_reviser_edits_the_answer_in_place_and_keeps_the_rest(task, wrong, expected):
    assert not is_correct(task, wrong)
    revised = revise_answer(task, wrong)
    assert revised == expected and is_correct(task, revised)
    assert revise_answer(task, expected) == expected  # a correct answer is left alone


def test_reference_answers_are_correct_and_short_and_grades_follow_the_rule():
    for task in make_tasks(200, seed=1):
        answer = reference_answer(task)
        assert is_correct(task, answer) and grade(task, answer) == 10, (task, answer)
    assert grade(ADD, "12 + 19 = 31") == 10
    assert grade(ADD, "Adding twelve and nineteen gives us the result of 31 as you can see here") == 7
    assert grade(ADD, "12 + 19 = 30") == 3  # within 10%
    assert grade(ADD, "12 + 19 = 20") == 2  # within 50%
    assert grade(ADD, "12 + 19 = 99") == 1 and grade(ADD, "I do not know") == 1
    assert grade(ADD, "12 plus 19 is 19") == 1  # a number copied from the question is no answer
    assert grade(CAPITAL, "The capital is Paris.") == 2 and grade(CAPITAL, "New York.") == 1


def test_split_has_every_kind_on_both_sides_and_no_overlap():
    train, held_out = split_tasks(160, 300, seed=0)
    assert len(train) == 160 and len(held_out) == 300
    assert not {t.prompt for t in train} & {t.prompt for t in held_out}
    assert {t.kind for t in train} == {t.kind for t in held_out} == {"arithmetic", "units", "capitals"}
    assert split_tasks(160, 300, seed=0) == (train, held_out)


def test_statistics():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 9, 3, 4]) == 2
    assert edit_distance([], [5, 6]) == 2
    low, high = wilson_interval(30, 100)
    assert low == pytest.approx(0.2189, abs=1e-3) and high == pytest.approx(0.3958, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    values = [1.0, 2.0, 3.0, 4.0]
    low, high = t_interval(values)
    half = 3.182 * math.sqrt(sum((v - 2.5) ** 2 for v in values) / 3) / 2
    assert (low, high) == (pytest.approx(2.5 - half, abs=1e-3), pytest.approx(2.5 + half, abs=1e-3))


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_judge_and_stronger_builders_and_their_statistics():
    tasks = [ADD, UNITS, CAPITAL]
    first = [["12 + 19 = 31", "12 + 19 = 30"], ["180", "180 minutes"], ["Paris", "Rome"]]
    pairs = judge_pairs(tasks, [first])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("12 + 19 = 31", "12 + 19 = 30")]  # ties dropped
    second = [["12 + 19 = 1", "31"], ["90", "180"], ["Berlin", "Washington"]]
    both = judge_pairs(tasks, [first, second])  # a tie looks at the next draw; a decided question does not
    assert [(p["chosen"], p["rejected"], p["meta"]["index"]) for p in both] == [
        ("12 + 19 = 31", "12 + 19 = 30", 0), ("180", "90", 1), ("Washington", "Berlin", 2)]
    clair = [{"prompt": ADD.prompt, "chosen": "12 + 19 = 31", "rejected": "12 + 19 = 30",
              "meta": {"index": 0, "kind": "arithmetic"}}]
    stronger = stronger_pairs(tasks, clair)
    assert stronger[0]["chosen"] == "The answer is 31." and stronger[0]["rejected"] == "12 + 19 = 30"
    greedy = ["12 + 19 = 31", "no", "no"]
    stats = dataset_stats("judge", pairs, 1, tasks, greedy, _Tokenizer())
    assert stats["pairs"] == 1 and stats["edit_distance"] == 1.0
    assert stats["chosen_correct"] == 1.0 and stats["rejected_correct"] == 0.0
    assert stats["chosen_better_than_model"] == 0.0  # M's greedy answer is as good


def test_program_reviser_in_the_clair_pipeline(tmp_path):
    from pyalign.demo.tiny_model import save_tiny_chat_model

    tasks = make_tasks(8, seed=0)
    folder = save_tiny_chat_model(tmp_path / "tiny", extra_texts=[t.prompt for t in tasks] + ["The answer is"])
    by_prompt = {t.prompt: t for t in tasks}
    reviser = ProgramReviser(lambda prompt, response: revise_answer(by_prompt[prompt], response), name="test v1")
    settings = ClairSettings(output_format="plain", max_new_tokens=6, min_length_ratio=0.1, max_length_ratio=10.0)
    summary = make_clair_pairs([(t.prompt, None) for t in tasks], folder, reviser, tmp_path / "pairs.jsonl",
                               settings=settings, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert summary["kept"] == len(rows) > 0 and summary["reviser"] == {"kind": "program", "name": "test v1"}
    for row in rows:
        task = by_prompt[row["prompt"]]
        assert is_correct(task, row["chosen"]) and not is_correct(task, row["rejected"])
        assert row["chosen"] == revise_answer(task, row["rejected"])
    with pytest.raises(ValueError, match="output_format"):
        make_clair_pairs([(tasks[0].prompt, None)], folder, reviser, tmp_path / "other.jsonl", progress=False)


def test_quick_demo_end_to_end_writes_the_json_contract(tmp_path, capsys):
    out = tmp_path / "apo"
    assert apo_clair.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "apo_clair.json")
    result = json.loads((out / "apo_clair.json").read_text())
    assert set(result["base"]) >= {"accuracy", "accuracy_ci", "mean_length", "questions"}
    assert [d["name"] for d in result["datasets"]] == ["clair", "judge_on_policy", "judge_off_policy",
                                                        "stronger_preferred"]
    trained = [d for d in result["datasets"] if d["pairs"]]
    assert trained and all(set(d) >= {"pairs", "edit_distance", "chosen_correct", "chosen_better_than_model"}
                           for d in trained)
    assert {d["name"] for d in trained} >= {"clair", "stronger_preferred"}
    assert len(result["runs"]) == len(trained) * 4
    for row in result["runs"]:
        assert row["objective"] in ("dpo", "apo_zero", "apo_down", "sft")
        assert 0 <= row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1] <= 1
        assert isinstance(row["chosen_logp_change"], float) and isinstance(row["rejected_logp_change"], float)
    clair_stats = next(d for d in trained if d["name"] == "clair")
    assert clair_stats["chosen_correct"] == 1.0 and clair_stats["rejected_correct"] == 0.0
    assert (out / "apo_clair.png").stat().st_size > 0 and result["wall_time_s"] > 0
