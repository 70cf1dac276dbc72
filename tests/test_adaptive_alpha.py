"""SPO's adaptive alpha (dual ascent on the alphas from held-out margins of earlier dimensions) and
a run reusing another run's finished rounds (reuse_rounds_from): the update rule, config errors,
a real two-round run on a tiny model (trajectory written, alphas moved, crash + resume equal to
the uninterrupted run) and a round linked instead of retrained."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny_lm import Crash, make_pairs, one_thread, save_tiny_model, write_jsonl
from pyalign.tasks.preference.adaptive_alpha import LOG_FILE, dual_ascent_step, mean_margin
from pyalign.train import ConfigError, load_config
from pyalign.tasks.preference.rounds import run_sequential

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive_assets")
    model = save_tiny_model(root / "pi0", seed=0)
    first = make_pairs(8, seed=10, marker="bright")
    # dimension 2 prefers what dimension 1 disprefers: its round pulls dimension 1's margin down
    second = [{**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]} for pair in first]
    files = {"train0": write_jsonl(root / "train0.jsonl", first),
             "eval0": write_jsonl(root / "eval0.jsonl", make_pairs(6, seed=20, marker="bright")),
             "train1": write_jsonl(root / "train1.jsonl", second),
             "eval1": write_jsonl(root / "eval1.jsonl", make_pairs(6, seed=21, marker="cold"))}
    return model, files


def make_config(assets, output_dir, adaptive=None, **method):
    model, files = assets
    return {
        "model": {"path": str(model)},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "method": {"loss": "spo", "alpha": 0.2, "beta": 0.1, "adaptive_alpha": adaptive, **method},
        "rounds": [{"name": f"dim{i}", "train": str(files[f"train{i}"]), "eval": str(files[f"eval{i}"])}
                   for i in range(2)],
        "training": {"lr": 2e-2, "epochs": 2, "batch_size": 2, "max_length": 32, "max_prompt_length": 16,
                     "warmup_ratio": 0.0, "save_every": 2, "log_every": 1, "progress_bar": False,
                     "tensorboard": False, "device": "cpu"},
        "output_dir": str(output_dir),
    }


def test_dual_ascent_moves_alpha_towards_the_threshold_and_clips():
    # below the threshold: up by step_size x relative shortfall; above: down; clipped to [0, 1]
    assert dual_ascent_step([0.2, 0.2], [0.8, 1.2], [1.0, 1.0], 1.0) == pytest.approx([0.4, 0.0])
    assert dual_ascent_step([0.9, 0.1], [-1.0, 2.0], [1.0, 1.0], 0.5) == [1.0, 0.0]
    # the shortfall is relative: the same fraction short moves alpha alike at any scale
    assert dual_ascent_step([0.5], [4.0], [5.0], 1.0) == pytest.approx(dual_ascent_step([0.5], [0.4], [0.5], 1.0))
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.5])
    reference = (torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    # beta * mean[(c - c0) - (r - r0)] = 0.1 * mean[(1 - -1), (0 - -0.5)] = 0.125
    assert mean_margin((chosen, rejected), reference, 0.1) == pytest.approx(0.125)


@pytest.mark.parametrize("change, message", [
    ({"loss": "dpo"}, r"method.adaptive_alpha: only the spo loss"),
    ({"alpha": 0.0}, r"method.alpha: adaptive alpha starts from method.alpha and needs it above 0"),
    ({"adaptive_alpha": {"keep": 1.5}}, r"method.adaptive_alpha.keep: expected a fraction in \(0, 1\]"),
    ({"adaptive_alpha": {"every": 0}}, r"method.adaptive_alpha.every: expected a positive integer"),
    ({"adaptive_alpha": {"threshold": 1}}, r"method.adaptive_alpha.threshold: unknown field"),
])
def test_config_errors_name_the_field(assets, tmp_path, change, message):
    config = make_config(assets, tmp_path, adaptive={"keep": 0.9})
    config["method"].update(change)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_config_needs_eval_pairs_of_earlier_rounds(assets, tmp_path):
    config = make_config(assets, tmp_path, adaptive={})
    del config["rounds"][0]["eval"]
    with pytest.raises(ConfigError, match=r"rounds\[0\].eval: adaptive alpha measures"):
        load_config(config)
    config["method"]["adaptive_alpha"] = None
    load_config(config)  # fixed alphas need no eval pairs


def final_weights(directory):
    return load_file(str(directory / "round_2_dim1" / "model" / "model.safetensors"))


def test_adaptive_run_writes_its_trajectory_and_resumes_exactly(assets, tmp_path):
    adaptive = {"keep": 1.0, "every": 2, "step_size": 0.1, "max_pairs": 4}
    straight = run_sequential(make_config(assets, tmp_path / "a", adaptive=adaptive))
    log = json.loads((straight.round_dirs[1] / LOG_FILE).read_text())
    # 8 pairs / batch 2 = 4 steps per epoch, 2 epochs: updates after steps 2, 4, 6, 8
    assert [entry["step"] for entry in log["history"]] == [2, 4, 6, 8]
    assert log["history"][0]["alphas_before"] == [0.2]
    assert log["thresholds"] == pytest.approx(log["start_margins"])  # keep 1.0
    for entry in log["history"]:  # each update follows the rule from its own measurement
        expected = dual_ascent_step(entry["alphas_before"], entry["margins"], log["thresholds"], 0.1)
        assert entry["alphas"] == pytest.approx(expected)
    # dimension 2 pulls dimension 1 below its threshold: alpha rises at every update
    assert all(entry["alphas"][0] > entry["alphas_before"][0] for entry in log["history"][:2])
    state = json.loads((straight.round_dirs[1] / "round_state.json").read_text())
    assert state["fingerprint"]["adaptive_alpha"]["step_size"] == 0.1
    assert "adaptive_alpha" not in json.loads((straight.round_dirs[0] / "round_state.json").read_text())["fingerprint"]

    # killed right after the update at step 4 (a checkpoint step): resumes with the updated alpha
    def crash(event, info):
        if event == "step" and info["round"] == 2 and info["step"] == 5:
            raise Crash
    config = make_config(assets, tmp_path / "b", adaptive=adaptive)
    with pytest.raises(Crash):
        run_sequential(config, callback=crash)
    resumed = run_sequential(config)
    assert json.loads((resumed.round_dirs[1] / LOG_FILE).read_text())["history"] == log["history"]
    for name, tensor in final_weights(tmp_path / "a").items():
        assert torch.equal(tensor, final_weights(tmp_path / "b")[name]), name


def test_finished_rounds_are_reused_from_another_run_when_their_fingerprint_matches(assets, tmp_path):
    first = run_sequential(make_config(assets, tmp_path / "alpha_0.2"))
    events = []
    config = make_config(assets, tmp_path / "alpha_0.6", alpha=0.6)
    config["reuse_rounds_from"] = str(tmp_path / "alpha_0.2")
    second = run_sequential(config, callback=lambda event, info: events.append((event, info.get("round"))))
    # round 1 does not depend on alpha: linked, not retrained; round 2 does: trained
    assert {r for e, r in events if e == "step"} == {2}
    linked = second.round_dirs[0] / "model" / "model.safetensors"
    assert os.path.samefile(linked, first.round_dirs[0] / "model" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final_weights(tmp_path / "alpha_0.2")[name], final_weights(tmp_path / "alpha_0.6")[name])
    assert json.loads((second.round_dirs[1] / "round_state.json").read_text())["fingerprint"]["alphas"] == [0.6]

    # a run whose round 1 differs (another learning rate) trains it itself
    config = make_config(assets, tmp_path / "other_lr", alpha=0.6)
    config["training"]["lr"] = 1e-2
    config["reuse_rounds_from"] = str(tmp_path / "alpha_0.2")
    events.clear()
    run_sequential(config, callback=lambda event, info: events.append((event, info.get("round"))))
    assert {r for e, r in events if e == "step"} == {1, 2}
