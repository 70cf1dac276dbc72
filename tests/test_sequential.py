"""The sequential SPO driver: outputs, crash + resume == uninterrupted, the frozen log-prob cache
(computed once, stale entries refused or recomputed), chain selection per round."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny_lm import Crash, crash_at, make_pairs, one_thread, save_tiny_model, write_jsonl
from pyalign.train import StaleLogprobCacheError, load_config
from pyalign.tasks.preference.rounds import chain_models, round_alphas, run_sequential

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("spo_assets")
    model = save_tiny_model(root / "pi0", seed=0)
    files = {}
    for i, marker in enumerate(["bright", "cold", "fast"]):
        files[f"train{i}"] = write_jsonl(root / f"train{i}.jsonl", make_pairs(10, seed=10 + i, marker=marker))
        files[f"eval{i}"] = write_jsonl(root / f"eval{i}.jsonl", make_pairs(4, seed=20 + i, marker=marker))
    return model, files


def make_config(assets, output_dir, rounds=3, **training):
    model, files = assets
    return {
        "model": {"path": str(model)},
        "lora": {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [8, 9]},
        "method": {"loss": "spo", "alpha": 0.3, "beta": 0.1},
        "rounds": [{"name": f"dim{i}", "train": str(files[f"train{i}"]), "eval": str(files[f"eval{i}"])}
                   for i in range(rounds)],
        "training": {"lr": 5e-3, "epochs": 2, "batch_size": 2, "grad_accum": 2, "max_length": 32,
                     "max_prompt_length": 16, "warmup_ratio": 0.2, "save_every": 2, "log_every": 1,
                     "progress_bar": False, "tensorboard": False, "device": "cpu", **training},
        "output_dir": str(output_dir),
    }


def final_weights(result):
    return load_file(str(result.final_model_dir / "model.safetensors"))


def recorder(events):
    return lambda event, info: events.append((event, {k: v for k, v in info.items() if k not in ("path", "metrics")}))


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    events = []
    result = run_sequential(make_config(assets, out), callback=recorder(events))
    return result, events


def test_run_writes_rounds_models_and_metrics(uninterrupted):
    result, events = uninterrupted
    assert [d.name for d in result.round_dirs] == ["round_1_dim0", "round_2_dim1", "round_3_dim2"]
    for directory in result.round_dirs:
        assert (directory / "model" / "config.json").is_file()
        assert (directory / "model" / "tokenizer.json").is_file()
        assert (directory / "adapter" / "adapter_config.json").is_file()
        assert not (directory / "checkpoints").exists()
        state = json.loads((directory / "round_state.json").read_text())
        assert state["status"] == "finished"
    assert result.final_model_dir == result.round_dirs[-1] / "model"
    assert len(result.metrics) == 3 and "reward_accuracy" in result.metrics[-1]["eval"]
    # 10 pairs / (2 x 2) -> 3 steps per epoch, 2 epochs, 3 rounds
    assert sum(1 for e, _ in events if e == "step") == 18
    # every frozen model is run once per later round and split: pi_0 on rounds 1-3, pi_1 on 2-3, pi_2 on 3
    cached = sorted((info["model"], info["round"], info["split"]) for e, info in events if e == "cache_saved")
    assert cached == sorted((m, r, s) for m in range(3) for r in range(m + 1, 4) for s in ("train", "eval"))


@pytest.mark.parametrize("where", ["mid_round_2", "end_of_round_1_caching", "after_round_1"])
def test_crash_and_resume_reproduces_the_uninterrupted_run(assets, uninterrupted, tmp_path, where):
    crash = {
        "mid_round_2": crash_at("step", lambda i: i["round"] == 2 and i["step"] == 5),
        "end_of_round_1_caching": crash_at("cache_saved", lambda i: i["model"] == 1 and i["split"] == "eval"),
        "after_round_1": crash_at("round_done", lambda i: i["round"] == 1),
    }[where]
    config = make_config(assets, tmp_path)
    with pytest.raises(Crash):
        run_sequential(config, callback=crash)
    events = []
    resumed = run_sequential(config, callback=recorder(events))

    expected, _ = uninterrupted
    for name, tensor in final_weights(expected).items():
        assert torch.equal(tensor, final_weights(resumed)[name]), name
    steps = [info for e, info in events if e == "step"]
    assert not any(info["round"] == 1 for info in steps)  # round 1 not redone
    if where == "mid_round_2":
        round_2 = [info["step"] for info in steps if info["round"] == 2]
        assert round_2[0] == 5  # resumed from the checkpoint at step 4
        assert not any(e == "cache_saved" and info["model"] < 2 for e, info in events)
    if where == "end_of_round_1_caching":
        recomputed = [(info["model"], info["round"], info["split"]) for e, info in events if e == "cache_saved"]
        assert [entry for entry in recomputed if entry[0] == 1] == [(1, 3, "train"), (1, 3, "eval")]
    assert expected.metrics[-1]["eval"] == resumed.metrics[-1]["eval"]


def test_stale_cache_is_refused_then_recomputed_on_request(assets, tmp_path):
    model, files = assets
    config = make_config(assets, tmp_path / "out", rounds=2)
    changed_train = write_jsonl(tmp_path / "train1.jsonl", make_pairs(10, seed=11, marker="cold"))
    config["rounds"][1]["train"] = str(changed_train)
    with pytest.raises(Crash):
        run_sequential(config, callback=crash_at("step", lambda i: i["step"] == 1))

    # round 2's data changes after pi_0's log-probs on it were cached
    write_jsonl(changed_train, make_pairs(10, seed=99, marker="cold"))
    with pytest.raises(StaleLogprobCacheError, match=r"round_2_train.pt.*data_fingerprint"):
        run_sequential(config)
    # so do the tokenisation settings
    config["training"]["max_length"] = 30
    with pytest.raises(StaleLogprobCacheError, match=r"tokenization.max_length \(cached 32, now 30\)"):
        run_sequential(config)
    config["training"]["max_length"] = 32

    events = []
    result = run_sequential(config, callback=recorder(events), recompute_stale_cache=True)
    recomputed = {(info["model"], info["round"], info["split"]) for e, info in events if e == "cache_saved"}
    assert (0, 2, "train") in recomputed and (0, 1, "train") not in recomputed
    assert (result.final_model_dir / "model.safetensors").is_file()


def test_finished_round_with_changed_settings_is_refused(assets, tmp_path):
    config = make_config(assets, tmp_path, rounds=1, epochs=1)
    run_sequential(config)
    events = []
    config["method"]["alpha"] = 0.7  # round 1 does not use alpha: still finished
    config["training"]["log_every"] = 5  # neither do logging fields matter
    run_sequential(config, callback=recorder(events))
    assert not any(event == "step" for event, _ in events)
    config["training"]["lr"] = 1e-3
    with pytest.raises(RuntimeError, match="round 1 was finished under different settings"):
        run_sequential(config)


def test_chain_per_round(assets, tmp_path):
    config = load_config(make_config(assets, tmp_path, rounds=3))
    assert [chain_models(config, n) for n in (1, 2, 3)] == [[0], [0, 1], [0, 1, 2]]
    assert round_alphas(config, 3) == [0.3, 0.3]
    config.method.alpha = [0.0, 0.5]
    assert round_alphas(config, 2) == [] and chain_models(config, 2) == [1]  # S-DPO round
    assert round_alphas(config, 3) == [0.0, 0.5] and chain_models(config, 3) == [0, 1, 2]
    config.method.alpha = 0.0
    assert [chain_models(config, n) for n in (1, 2, 3)] == [[0], [1], [2]]
    config.method.loss = "apo_zero"
    assert [chain_models(config, n) for n in (1, 2, 3)] == [[0], [1], [2]]


@pytest.mark.gpu
def test_gpu_run_with_bf16_autocast_resumes_close_to_uninterrupted(assets, tmp_path):
    """On CUDA the policy runs under bf16 autocast; kernels may reduce in varying order, so the
    resumed run is compared with a tolerance instead of bit for bit."""
    straight = run_sequential(make_config(assets, tmp_path / "a", rounds=2, device="cuda"))
    config = make_config(assets, tmp_path / "b", rounds=2, device="cuda")
    with pytest.raises(Crash):
        run_sequential(config, callback=crash_at("step", lambda i: i["round"] == 2 and i["step"] == 3))
    resumed = run_sequential(config)
    key = json.loads((tmp_path / "a" / "round_2_dim1" / "round_state.json").read_text())["fingerprint"]
    assert key["training"]["mixed_precision"] == "auto"
    cached = torch.load(tmp_path / "a" / "logprob_cache" / "model_0" / "round_1_train.pt", weights_only=True)
    assert cached["key"]["precision"] == "float32+bf16-autocast"
    for name, tensor in final_weights(straight).items():
        assert torch.allclose(tensor, final_weights(resumed)[name], atol=1e-3, rtol=1e-3), name
    assert straight.metrics[-1]["eval"]["loss"] == pytest.approx(resumed.metrics[-1]["eval"]["loss"], abs=1e-2)
