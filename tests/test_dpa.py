"""The DPA loop: the quick demo end to end, its outputs, crash + resume == uninterrupted at every
kind of stage, the pairwise fine-tune, continuing from the previous iteration, and bad input."""

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny_lm import Crash, crash_at, one_thread
from pyalign.demo import dpa as demo
from pyalign.directions import parse_direction
from pyalign.io import read_json, read_jsonl_rows, write_jsonl_atomic
from pyalign.train import ConfigError, load_config
from pyalign.tasks.dpa.loop import run_dpa
from pyalign.tasks.dpa.data import (
    best_worst_pairs, chosen_examples, iteration_prompts, load_prompt_rows, plan_rows, replay_examples,
)
from pyalign.tasks.dpa.evaluate import control_check, ranks, spearman

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo once (tiny policy, a reward model trained on its rated samples, two DPA
    iterations with evaluation): the uninterrupted run the crash tests compare against."""
    out = tmp_path_factory.mktemp("dpa_quick")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert demo.main(["--quick", "--out", str(out)]) == 0
    lines = buffer.getvalue().strip().splitlines()
    return out, lines


def base_config(quick_demo, output_dir, **sections):
    out, _ = quick_demo
    config = read_json(out / "dpa_config.json")
    config["output_dir"] = str(output_dir)
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def recorder(events):
    return lambda event, info: events.append((event, {k: v for k, v in info.items() if k != "metrics"}))


def without_paths(fronts):
    for iteration in fronts["iterations"]:
        iteration.pop("model")
    return fronts


def model_weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_quick_demo_prints_tables_and_writes_the_json_contract(quick_demo):
    out, lines = quick_demo
    assert lines[-1] == str(out / "dpa_demo.json")
    text = "\n".join(lines)
    for needle in ("Front of iteration 0", "Front of iteration 2", "control (last iteration)", "wall time"):
        assert needle in text
    result = json.loads((out / "dpa_demo.json").read_text())
    for objective in ("helpfulness", "verbosity"):
        assert set(result["reward_model"]["heldout"][objective]) >= {"mse", "pearson", "pairwise_accuracy"}
    assert [it["iteration"] for it in result["iterations"]] == [0, 1, 2]
    directions = [[p["v"] for p in it["front"]] for it in result["iterations"]]
    assert directions[0] == directions[1] == directions[2] and len(directions[0]) == 4
    assert directions[0][0] == [1.0, 0.0] and directions[0][-1] == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5)])
    for point in result["iterations"][-1]["front"]:
        assert set(point) >= {"v", "angle", "reward_model", "true"}
        assert set(point["true"]) == {"helpfulness", "verbosity"}
        assert all(0 <= value <= 100 for value in point["true"].values())
    assert result["control"]["objective"] == "verbosity" and "spearman" in result["control"]
    assert set(result["outcomes"]) == {"iteration_0", "iteration_1", "iteration_2"}
    last = result["outcomes"]["iteration_2"]
    assert 0 <= last["helpfulness_interval"][0] <= last["helpfulness"] <= last["helpfulness_interval"][1] <= 100
    assert last["verbosity_gap"] is None  # the quick demo keeps the paper's range: no v[1] > 0
    assert "helpfulness_change_from_pi0" in last and "helpfulness_change_from_pi0" not in result["outcomes"]["iteration_0"]
    assert "Held-out outcomes" in text
    assert result["wall_time_s"] > 0
    assert (out / "dpa" / "fronts.png").stat().st_size > 1000


def test_loop_outputs(quick_demo):
    out, _ = quick_demo
    dpa = out / "dpa"
    config = load_config(dpa / "config.json")
    train_rows = load_prompt_rows(config.prompts.train)
    halves = [iteration_prompts(train_rows, t) for t in (1, 2)]
    assert not {r["prompt"] for r in halves[0]} & {r["prompt"] for r in halves[1]}
    for t, half in zip((1, 2), halves):
        directory = dpa / f"iteration_{t}"
        scored = read_jsonl_rows(directory / "scored.jsonl")
        assert [r["prompt"] for r in scored] == [r["prompt"] for r in half for _ in range(2)]  # m = 2
        for row in scored:
            assert len(row["samples"]) == 3  # n = 3
            for sample in row["samples"]:
                assert len(sample["scores"]) == 2
                assert sample["weighted"] == pytest.approx(sum(a * b for a, b in zip(row["v"], sample["scores"])))
            assert row["system"].startswith("maximize weighted rating = helpfulness*")
        chosen = read_jsonl_rows(directory / "chosen.jsonl")
        assert [c["weighted"] for c in chosen] == [max(s["weighted"] for s in r["samples"]) for r in scored]
        train = read_jsonl_rows(directory / "train.jsonl")
        assert len(train) == len(chosen) + round(0.15 / 0.85 * len(chosen))  # ~15% replay
        state = read_json(directory / "fine_tune" / "state.json")
        assert state["status"] == "finished"
    base = model_weights(config.model.path)
    tuned = model_weights(dpa / "iteration_2" / "fine_tune" / "model")
    assert any(not torch.equal(base[name], tuned[name]) for name in base)


def test_selection_and_replay_helpers():
    rows = [{"prompt": "p", "system": "s", "v": [1.0, 0.0], "samples": [
        {"text": "a", "scores": [10, 0], "weighted": 10.0}, {"text": "b", "scores": [30, 0], "weighted": 30.0},
        {"text": "c", "scores": [30, 5], "weighted": 30.0}, {"text": "d", "scores": [5, 0], "weighted": 5.0}]},
        {"prompt": "q", "system": "s", "v": [1.0, 0.0], "samples": [
            {"text": "x", "scores": [1, 1], "weighted": 1.0}, {"text": "y", "scores": [1, 2], "weighted": 1.0}]}]
    assert [c["response"] for c in chosen_examples(rows)] == ["b", "x"]  # first of equals
    pairs, skipped = best_worst_pairs(rows)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "d")] and skipped == 1  # ties give no pair
    pool = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    drawn = replay_examples(pool, 17, 0.15, seed=0, iteration=1)
    assert len(drawn) == 3 and drawn == replay_examples(pool, 17, 0.15, seed=0, iteration=1)
    assert drawn != replay_examples(pool, 17, 0.15, seed=0, iteration=2)
    assert replay_examples(pool, 17, 0.0, seed=0, iteration=1) == []
    assert len(replay_examples(pool[:2], 170, 0.15, seed=0, iteration=1)) == 2  # all of a small pool
    assert ranks([3, 1, 3, 2]) == [3.5, 1, 3.5, 2]
    assert spearman([0, -0.3, -0.5, -0.7], [90, 80, 60, 20]) == pytest.approx(1.0)
    assert spearman([0, -0.3, -0.5, -0.7], [20, 60, 80, 90]) == pytest.approx(-1.0)
    front = [{"v": [1.0, -w], "true": {"helpfulness": 50, "verbosity": 100 - 50 * w}} for w in (0, 0.2, 0.6)]
    control = control_check(front, ["helpfulness", "verbosity"], "verbosity")
    assert control["spearman"] == pytest.approx(1.0) and 0 < control["p_value"] < 0.4  # 2/3! of 3 points
    from pyalign.tasks.dpa.evaluate import permutation_p_value

    ten = [-i / 10 for i in range(10)]
    assert permutation_p_value(ten, list(range(10)), -1.0) < 0.001
    shuffled = [5, 3, 8, 1, 9, 2, 7, 4, 0, 6]
    assert permutation_p_value(ten, shuffled, spearman(ten, shuffled)) > 0.2  # rho = 0.13: no evidence


def test_directions_per_prompt_do_not_depend_on_the_number_of_prompts(quick_demo, tmp_path):
    config = load_config(base_config(quick_demo, tmp_path))
    rows = load_prompt_rows(config.prompts.train)
    few = plan_rows(config, iteration_prompts(rows, 1, per_iteration=2), 1)
    every = plan_rows(config, iteration_prompts(rows, 1), 1)
    assert every[:len(few)] == few
    assert plan_rows(config, iteration_prompts(rows, 2), 2) != every


def test_words_prompt_style_reaches_the_plan_and_is_validated(quick_demo, tmp_path):
    raw = base_config(quick_demo, tmp_path)
    config = load_config({**raw, "directions": {**raw["directions"], "prompt_style": "words"}})
    rows = plan_rows(config, iteration_prompts(load_prompt_rows(config.prompts.train), 1), 1)
    assert all(row["system"].startswith("Aim for ") and "maximize weighted rating = " in row["system"] for row in rows)
    for row in rows:
        assert parse_direction(row["system"], config.objectives) == pytest.approx(row["v"], abs=0.01)
    with pytest.raises(ConfigError, match="directions.prompt_style"):
        load_config({**raw, "directions": {**raw["directions"], "prompt_style": "prose"}})


@pytest.mark.parametrize("where", ["generation", "scoring", "fine_tune", "evaluation", "selection"])
def test_crash_and_resume_reproduces_the_uninterrupted_run(quick_demo, tmp_path, where):
    out, _ = quick_demo
    crash = {
        "generation": crash_at("generated", lambda i: i["stage"] == "iteration" and i["iteration"] == 2
                               and i["rows"] == 4),
        "scoring": crash_at("scored", lambda i: i["stage"] == "iteration" and i["iteration"] == 1 and i["rows"] == 4),
        "fine_tune": crash_at("step", lambda i: i["round"] == 2 and i["step"] == 2),
        "evaluation": crash_at("scored", lambda i: i["stage"] == "evaluation" and i["iteration"] == 1
                               and i["rows"] == 4),
        "selection": crash_at("selected", lambda i: i["iteration"] == 2),
    }[where]
    config = base_config(quick_demo, tmp_path / "run")
    with pytest.raises(Crash):
        run_dpa(config, callback=crash)
    latest = tmp_path / "run" / "iteration_2" / "fine_tune" / "checkpoints" / "latest.json"
    checkpoint_step = read_json(latest)["step"] if latest.is_file() else 0
    events = []
    resumed = run_dpa(config, callback=recorder(events))

    expected = out / "dpa"
    for t in (1, 2):
        for name in ("samples.jsonl", "scored.jsonl", "chosen.jsonl", "train.jsonl"):
            assert (resumed.output_dir / f"iteration_{t}" / name).read_bytes() == \
                (expected / f"iteration_{t}" / name).read_bytes(), (t, name)
        assert model_weights(resumed.model_dirs[t]).keys() == model_weights(expected / f"iteration_{t}/fine_tune/model").keys()
        for name, tensor in model_weights(expected / f"iteration_{t}" / "fine_tune" / "model").items():
            assert torch.equal(tensor, model_weights(resumed.model_dirs[t])[name]), (t, name)
    assert without_paths(json.loads(resumed.fronts_file.read_text())) == \
        without_paths(json.loads((expected / "fronts.json").read_text()))

    # finished work was not redone
    generated = [i for e, i in events if e == "generated"]
    scored = [i for e, i in events if e == "scored"]
    steps = [i for e, i in events if e == "step"]
    assert not any(i["stage"] == "iteration" and i["iteration"] == 1 for i in generated)
    if where == "generation":  # iteration 2's first chunk (4 rows of 8) was kept
        assert [i["rows"] for i in generated if i["stage"] == "iteration"] == [8]
        assert not any(i["round"] == 1 for i in steps)
    if where == "scoring":
        assert [i["rows"] for i in scored if i["stage"] == "iteration" and i["iteration"] == 1] == [8]
    if where == "fine_tune":  # resumed from the last checkpoint (step 1 or 2 of 3), not from scratch
        assert checkpoint_step >= 1 and [i["step"] for i in steps] == list(range(checkpoint_step + 1, 4))
        assert not any(i["stage"] == "iteration" for i in generated + scored)
    if where == "evaluation":
        assert [i["rows"] for i in scored if i["stage"] == "evaluation" and i["iteration"] == 1] == [8, 12]
        assert not any(i["stage"] == "evaluation" and i["iteration"] == 0 for i in generated + scored)


def test_pairwise_fine_tune_and_continuing_from_the_previous_iteration(quick_demo, tmp_path):
    config = base_config(quick_demo, tmp_path / "pairwise", loop={"fine_tune": "pairwise", "restart_from_base": False},
                         method={"loss": "apo_zero", "beta": 0.1})
    config["prompts"] = {k: v for k, v in config["prompts"].items() if k != "eval"}  # no evaluation: faster
    result = run_dpa(config)
    assert result.fronts is None
    for t in (1, 2):
        directory = result.output_dir / f"iteration_{t}"
        pairs = read_jsonl_rows(directory / "pairs.jsonl")
        train = read_jsonl_rows(directory / "train.jsonl")
        assert pairs and [set(r) for r in train] == [{"prompt", "system", "chosen", "rejected"}] * len(pairs)
        assert all(p["margin"] > 0 for p in pairs)
        assert list((directory / "fine_tune" / "logprob_cache").rglob("*.pt"))
    # continuing: iteration 2 fine-tunes pi_1, not pi_0
    from pyalign.models import model_fingerprint

    state = read_json(result.output_dir / "iteration_2" / "fine_tune" / "state.json")
    assert state["fingerprint"]["base_model"] == model_fingerprint(result.model_dirs[1])
    assert state["fingerprint"]["method"]["loss"] == "apo_zero"


@pytest.mark.parametrize("fine_tune", ["sft", "pairwise"])
def test_conversation_prompts_run_through_the_loop(quick_demo, tmp_path, fine_tune):
    """A prompt file row may hold a conversation: it is sampled, scored and trained on as chat
    messages (the direction in the system prompt), through SFT with replay and the pairwise loss."""
    config = base_config(quick_demo, tmp_path / "run", loop={"iterations": 1, "fine_tune": fine_tune},
                         method={"loss": "dpo", "beta": 0.1})
    rows = read_jsonl_rows(config["prompts"]["train"])
    conversation = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. Ask me anything."},
                    {"role": "user", "content": rows[0]["prompt"]}]
    rows[0] = {**rows[0], "prompt": conversation}
    rows[1] = {**rows[1], "prompt": [{"role": "user", "content": rows[1]["prompt"]}]}  # one message: its text
    train_file = write_jsonl_atomic(tmp_path / "prompts.jsonl", rows)
    config["prompts"] = {**{k: v for k, v in config["prompts"].items() if k != "eval"}, "train": str(train_file)}
    loaded = load_prompt_rows(train_file)
    assert loaded[0]["prompt"] == conversation and loaded[1]["prompt"] == rows[1]["prompt"][0]["content"]
    result = run_dpa(config)
    directory = result.output_dir / "iteration_1"
    scored = read_jsonl_rows(directory / "scored.jsonl")
    assert [r["prompt"] for r in scored[:2]] == [conversation] * 2  # m = 2 directions of the first prompt
    train = read_jsonl_rows(directory / "train.jsonl")
    assert any(r["prompt"] == conversation and r["system"].startswith("maximize weighted rating") for r in train)
    assert read_json(directory / "fine_tune" / "state.json")["status"] == "finished"


def test_bad_conversation_prompts_name_the_line_and_the_field(tmp_path):
    cases = [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         r"bad.jsonl:1: field 'prompt' opens with a system message, but the DPA loop writes the direction"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         r"bad.jsonl:1: field 'prompt' must end with the user's turn"),
        ([{"role": "user", "content": 3}], r"bad.jsonl:1: field 'prompt'\[0\].content must be a string"),
        ([], r"bad.jsonl:1: field 'prompt' must be a non-empty list of chat messages"),
    ]
    for prompt, message in cases:
        bad = write_jsonl_atomic(tmp_path / "bad.jsonl", [{"prompt": prompt}])
        with pytest.raises(ValueError, match=message):
            load_prompt_rows(bad)


def test_changed_settings_are_refused_not_reused(quick_demo, tmp_path):
    out, _ = quick_demo
    config = base_config(quick_demo, tmp_path / "run", loop={"iterations": 1})
    config["prompts"] = {k: v for k, v in config["prompts"].items() if k != "eval"}
    with pytest.raises(Crash):
        run_dpa(config, callback=crash_at("scored", lambda i: True))
    changed = copy.deepcopy(config)
    changed["sampling"]["temperature"] = 0.5
    with pytest.raises(RuntimeError, match=r"plan.json: iteration 1 was started under different settings \(changed: sampling\)"):
        run_dpa(changed)
    speed_only = copy.deepcopy(config)
    speed_only["sampling"]["batch_size"] = 3  # how fast, not what: the run resumes
    run_dpa(speed_only)


def test_bad_input_names_the_field(quick_demo, tmp_path):
    config = base_config(quick_demo, tmp_path / "run")
    wrong = {**config, "objectives": ["verbosity", "helpfulness"]}
    with pytest.raises(ConfigError, match=r"objectives: the reward model .* predicts \['helpfulness', 'verbosity'\]"):
        load_config(wrong)
    empty = write_jsonl_atomic(tmp_path / "empty.jsonl", [{"prompt": "  "}, {"question": "What?"}])
    with pytest.raises(ValueError, match=r"prompts.train: .*empty.jsonl has no usable prompts .*without a 'prompt' "
                                         r"field: 1, with an empty 'prompt': 1"):
        run_dpa({**config, "prompts": {**config["prompts"], "train": str(empty)}})
    with pytest.raises(ValueError, match=r"prompts.eval: .*:1: field 'prompt' must be a string"):
        bad = write_jsonl_atomic(tmp_path / "bad.jsonl", [{"prompt": 3}])
        run_dpa({**config, "prompts": {**config["prompts"], "eval": str(bad)}})
    with pytest.raises(ConfigError, match=r"evaluation.vectors\[1\]: expected 2 components"):
        load_config({**config, "evaluation": {**config["evaluation"], "vectors": [[1, 0], [1, 0, 0]]}})
    with pytest.raises(ConfigError, match=r"evaluation.vectors\[0\]: expected a direction with a non-zero norm"):
        load_config({**config, "evaluation": {**config["evaluation"], "vectors": [[0, 0]]}})
    with pytest.raises(ConfigError, match="directions.signs: sampler sphere needs one sign per objective"):
        load_config({**config, "directions": {**config["directions"], "sampler": "sphere"}})
    with pytest.raises(ConfigError, match="method.loss: the pairwise fine-tune takes one of"):
        load_config({**config, "loop": {**config["loop"], "fine_tune": "pairwise"}, "method": {"loss": "spo"}})
    with pytest.raises(ConfigError, match="evaluation.true_ratings: pyalign.demo.dpa_tasks has no function 'nope'"):
        load_config({**config, "evaluation": {**config["evaluation"], "true_ratings": "pyalign.demo.dpa_tasks:nope"}})
    with pytest.raises(ConfigError, match="loop.replay_fraction: 0.15 needs original responses"):
        run_dpa({**config, "prompts": {"train": config["prompts"]["train"]}})


def test_true_ratings_missing_an_objective_is_an_error(quick_demo, tmp_path, monkeypatch):
    import pyalign.demo.dpa_tasks as tasks

    config = base_config(quick_demo, tmp_path / "run", loop={"iterations": 1})
    monkeypatch.setattr(tasks, "rate_record", lambda row, response, tokenizer: {"helpfulness": 1.0})
    with pytest.raises(ValueError, match="evaluation.true_ratings: returned no rating for the objective 'verbosity'"):
        run_dpa(config)


def test_torchrun_two_processes_compute_what_one_process_computes(quick_demo, tmp_path):
    """``torchrun --nproc_per_node 2 -m pyalign train`` on the quick loop: each process samples and
    scores its shard of every chunk and trains on its share of every step; process 0 writes.
    The samples are the single process's to the byte (each has its own seed), scores and weights
    to float rounding (reward-model batches and gradient sums are split differently)."""
    import os
    import socket
    import subprocess
    import sys

    out, _ = quick_demo
    config = base_config(quick_demo, tmp_path / "run", loop={"iterations": 1})
    file = tmp_path / "dpa.yaml"
    file.write_text(json.dumps(config))  # JSON is YAML
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "pyalign", "train", str(file), "--no-progress"]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("final model:") == 1  # one summary, from process 0

    expected, run = out / "dpa", tmp_path / "run"
    assert (run / "iteration_1" / "samples.jsonl").read_bytes() == (expected / "iteration_1" / "samples.jsonl").read_bytes()
    for mine, theirs in zip(read_jsonl_rows(run / "iteration_1" / "scored.jsonl"),
                            read_jsonl_rows(expected / "iteration_1" / "scored.jsonl"), strict=True):
        for a, b in zip(mine["samples"], theirs["samples"], strict=True):
            assert a["text"] == b["text"] and a["scores"] == pytest.approx(b["scores"], abs=1e-3)
    assert [c["response"] for c in read_jsonl_rows(run / "iteration_1" / "chosen.jsonl")] == \
        [c["response"] for c in read_jsonl_rows(expected / "iteration_1" / "chosen.jsonl")]
    theirs = model_weights(expected / "iteration_1" / "fine_tune" / "model")
    for name, tensor in model_weights(run / "iteration_1" / "fine_tune" / "model").items():
        assert torch.allclose(tensor, theirs[name], atol=1e-5, rtol=1e-4), name
    fronts = json.loads((run / "fronts.json").read_text())
    single = json.loads((expected / "fronts.json").read_text())
    for mine, theirs in zip(fronts["iterations"], single["iterations"][:2], strict=True):
        for a, b in zip(mine["front"], theirs["front"], strict=True):
            assert a["true"] == b["true"]
            assert a["reward_model"] == pytest.approx(b["reward_model"], abs=1e-3)


def test_iteration_outcomes_count_answers_and_pair_prompts(tmp_path):
    from pyalign.demo.checkable import wilson_interval  # noqa: PLC0415
    from pyalign.demo.dpa_outcomes import iteration_outcomes  # noqa: PLC0415

    def scored(t, rows):  # rows: (prompt, v_2, [(helpful, verbosity), ...])
        write_jsonl_atomic(tmp_path / "evaluation" / f"iteration_{t}" / "scored.jsonl", [
            {"prompt": p, "v": [math.sqrt(1 - w * w), w], "samples": [{"true": [h, v]} for h, v in samples]}
            for p, w, samples in rows])

    scored(0, [("a", 0.5, [(0, 50), (0, 50)]), ("a", -0.5, [(100, 50), (0, 50)]),
               ("b", 0.5, [(0, 40), (0, 40)]), ("b", -0.5, [(0, 40), (0, 40)])])
    scored(1, [("a", 0.5, [(100, 90), (100, 70)]), ("a", -0.5, [(100, 10), (0, 30)]),
               ("b", 0.5, [(0, 60), (100, 60)]), ("b", -0.5, [(100, 20), (100, 20)])])
    outcomes = iteration_outcomes(tmp_path, [0, 1])
    assert outcomes["iteration_0"]["helpfulness"] == 12.5 and outcomes["iteration_0"]["answers"] == 8
    assert outcomes["iteration_0"]["verbosity_gap"] == 0.0
    first = outcomes["iteration_1"]
    assert first["helpfulness"] == 75.0 and first["helpfulness_change_from_pi0"] == 62.5
    assert first["verbosity_gap"] == pytest.approx((90 + 70 + 60 + 60) / 4 - (10 + 30 + 20 + 20) / 4)
    low, high = first["verbosity_gap_interval"]
    assert low <= first["verbosity_gap"] <= high and low > 0  # every prompt has the longer answers for v_2 > 0
    assert first["helpfulness_interval"] == [round(100 * x, 2) for x in wilson_interval(6, 8)]
    scored(1, [("a", 0.5, [(0, 1)]), ("c", -0.5, [(0, 1)])])
    with pytest.raises(ValueError, match="iteration 1: evaluated on other prompts"):
        iteration_outcomes(tmp_path, [0, 1])


def test_replay_file_keeps_every_rated_answer_or_only_the_helpful_ones(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "ratings": {"helpfulness": float(i % 2), "verbosity": 3.0}}
            for i in range(5)]
    ratings = write_jsonl_atomic(tmp_path / "rating" / "ratings.jsonl", rows)
    settings = copy.deepcopy(demo.QUICK)
    assert demo.replay_file(settings, ratings, tmp_path) == ratings
    settings["rating"]["replay"] = "helpful"
    helpful = demo.replay_file(settings, ratings, tmp_path)
    assert helpful != ratings and [r["prompt"] for r in read_jsonl_rows(helpful)] == ["q1", "q3"]
    settings["rating"]["replay"] = "best"
    with pytest.raises(ValueError, match="rating.replay: expected 'all' or 'helpful', got 'best'"):
        demo.replay_file(settings, ratings, tmp_path)
    settings["rating"]["replay"] = "helpful"
    none = write_jsonl_atomic(tmp_path / "none.jsonl", [{**rows[0]}])
    with pytest.raises(ValueError, match="rating.replay: 'helpful' but no answer"):
        demo.replay_file(settings, none, tmp_path)


def test_demo_config_files_list_the_built_in_settings():
    root = Path(__file__).resolve().parents[1]
    assert demo.load_settings(False, str(root / "configs" / "dpa_demo.yaml")) == demo.FULL
    assert demo.load_settings(True, str(root / "configs" / "dpa_demo_quick.yaml")) == demo.QUICK
    # the default: directions of both signs, v in words (docs/dpa.md, "Arithmetic control")
    assert demo.FULL["dpa"]["directions"]["angle_range"] == demo.FULL["dpa"]["evaluation"]["angle_range"] == \
        pytest.approx([-math.pi / 4, math.pi / 4])
    assert demo.FULL["dpa"]["directions"]["prompt_style"] == "words"
    paper = demo.load_settings(False, str(root / "configs" / "dpa_demo_paper_settings.yaml"))
    assert paper["prompts_per_iteration"] is None
    assert paper["dpa"]["directions"]["prompt_style"] == "paper"
    assert paper["dpa"]["directions"]["angle_range"] == paper["dpa"]["evaluation"]["angle_range"] == \
        pytest.approx([-math.pi / 4, 0.0])
    assert (paper["dpa"]["directions"]["per_prompt"], paper["dpa"]["sampling"]["n"], paper["dpa"]["loop"]["iterations"],
            paper["dpa"]["training"]["epochs"], paper["dpa"]["evaluation"]["samples_per_prompt"]) == (2, 4, 2, 2, 1)
    variant = demo.load_settings(False, str(root / "configs" / "dpa_demo_m4n8.yaml"))
    assert (variant["dpa"]["directions"]["per_prompt"], variant["dpa"]["sampling"]["n"]) == (4, 8)
    assert {k: v for k, v in variant["dpa"].items() if k not in ("directions", "sampling")} == \
        {k: v for k, v in paper["dpa"].items() if k not in ("directions", "sampling")}
    assert variant["dpa"]["sampling"]["top_p"] == demo.FULL["dpa"]["sampling"]["top_p"]  # merged, not replaced
    with pytest.raises(ValueError, match="tasks.prompts: unknown setting"):
        demo.merge_settings(demo.FULL, {"tasks": {"prompts": 3}})
    both = demo.load_settings(False, str(root / "configs" / "dpa_demo_both_signs.yaml"))
    assert both["dpa"]["directions"]["angle_range"] == both["dpa"]["evaluation"]["angle_range"] == pytest.approx(
        [-math.pi / 4, math.pi / 4])
    assert {k: both["dpa"][k] for k in ("loop", "training")} == {k: variant["dpa"][k] for k in ("loop", "training")}
    pairwise = demo.merge_settings(demo.FULL, {"dpa": {"method": {"loss": "dpo", "nll_weight": 1.0}}})
    assert pairwise["dpa"]["method"] == {"loss": "dpo", "nll_weight": 1.0}  # a trainer section the defaults lack
    with pytest.raises(ValueError, match="dpa.bogus: unknown setting"):
        demo.merge_settings(demo.FULL, {"dpa": {"bogus": {}}})


@pytest.mark.gpu
def test_gpu_run_resumes_close_to_uninterrupted(quick_demo, tmp_path):
    """On CUDA (policy, reward model and fine-tunes on the GPU, bf16 autocast in training): a run
    killed mid fine-tune resumes to what an uninterrupted run computes, up to bf16 rounding."""
    straight = run_dpa(base_config(quick_demo, tmp_path / "a", training={"device": "cuda"}))
    config = base_config(quick_demo, tmp_path / "b", training={"device": "cuda"})
    with pytest.raises(Crash):
        run_dpa(config, callback=crash_at("step", lambda i: i["round"] == 2 and i["step"] == 2))
    resumed = run_dpa(config)
    assert (tmp_path / "a" / "iteration_1" / "samples.jsonl").read_bytes() == \
        (tmp_path / "b" / "iteration_1" / "samples.jsonl").read_bytes()
    for t in (1, 2):
        expected = model_weights(straight.model_dirs[t])
        for name, tensor in model_weights(resumed.model_dirs[t]).items():
            assert torch.allclose(tensor, expected[name], atol=1e-3, rtol=1e-3), (t, name)
    assert len(resumed.fronts["iterations"]) == 3


def _check_plan_worker(rank, world, port, plan_file, out_dir):
    import os
    import time

    from pyalign import distributed
    from pyalign.tasks.dpa.loop import DPARun

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env("cpu")
    if rank == 1:
        time.sleep(1.5)  # process 1 looks only after process 0 could have written the plan
    DPARun.check_plan(None, Path(plan_file), {"iteration": 1}, "iteration 1")
    gathered = distributed.gather_in_order([f"rank{rank}"])
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(gathered))
    distributed.shutdown()


def test_check_plan_keeps_processes_in_step_when_one_starts_late(tmp_path):
    """The torchrun deadlock CI hit: process 0 wrote plan.json before process 1 looked, so
    process 1 skipped a barrier and the next collective never matched."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_check_plan_worker, args=(2, port, str(tmp_path / "plan.json"), str(tmp_path)),
                       nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes deadlocked after check_plan")
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == ["rank0", "rank1"]
    assert read_json(tmp_path / "plan.json") == {"key": {"iteration": 1}}
