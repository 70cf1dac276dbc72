"""The DPA demo's task bank: deterministic distinct questions, the answer checker, true ratings."""

import pytest

from helpers_tiny_lm import make_tokenizer
from pyalign.demo.dpa_tasks import (
    KINDS, Task, capped_true_ratings, is_correct, kind_sizes, make_tasks, numbers_in, rate_record,
)


def test_bank_is_deterministic_distinct_and_mixes_kinds():
    tasks = make_tasks(120, seed=3)
    assert tasks == make_tasks(120, seed=3) and tasks != make_tasks(120, seed=4)
    assert len({t.prompt for t in tasks}) == 120
    assert [t.kind for t in tasks[:6]] == list(KINDS) * 2  # kinds in turn
    for task in tasks:
        assert is_correct(task, f"The answer is {task.answer}.")
        if task.kind == "arithmetic":  # the answer is never an operand: echoing the question is wrong
            assert not is_correct(task, task.prompt)
    everything = make_tasks(sum(kind_sizes().values()))
    assert len({t.prompt for t in everything}) == sum(kind_sizes().values())
    with pytest.raises(ValueError, match="count: the bank has"):
        make_tasks(sum(kind_sizes().values()) + 1)
    with pytest.raises(ValueError, match="kinds"):
        make_tasks(3, kinds=["poetry"])


def test_answer_checker():
    add = Task("What is 17 + 25?", "42", "arithmetic")
    assert is_correct(add, "17 + 25 = 42.") and is_correct(add, "It is 42.0")
    assert not is_correct(add, "It is 420 or 142") and not is_correct(add, "17 + 25")
    units = Task("How many meters are in 3 kilometers?", "3000", "units")
    assert is_correct(units, "There are 3,000 meters.") and not is_correct(units, "3 000")
    assert numbers_in("-7, 1,000 and 2.5") == [-7.0, 1000.0, 2.5]
    capital = Task("What is the capital of China?", "Beijing", "capitals", ("Peking",))
    assert is_correct(capital, "beijing!") and is_correct(capital, "Peking, of course")
    assert not is_correct(capital, "Beijingese food")


def test_true_ratings_and_prompt_rows():
    tokenizer = make_tokenizer()
    task = Task("What is 2 + 3?", "5", "arithmetic")
    ratings = capped_true_ratings(task, "the sun 5 is warm", tokenizer)
    assert ratings == {"helpfulness": 1.0, "verbosity": 5.0}
    assert capped_true_ratings(task, "the sun is warm", tokenizer, max_tokens=3) == {"helpfulness": 0.0, "verbosity": 3.0}
    row = {**task.to_record(), "max_tokens": 2}
    assert Task.from_record(row) == task
    assert rate_record(row, "5 the sun", tokenizer) == {"helpfulness": 1.0, "verbosity": 2.0}
    with pytest.raises(ValueError, match="answer: a task row needs"):
        rate_record({"prompt": "What is 2 + 3?", "kind": "arithmetic"}, "5", tokenizer)
