"""APO's two variants move the chosen responses' likelihood in opposite directions (D'Oosterlinck
et al., "Anchored Preference Optimization"): on the same pairs, apo_zero raises the winners'
likelihood (chosen reward beta*log(pi/pi_ref) > 0) and lowers the losers'; apo_down lowers both,
the losers more. A short real training run on the tiny model; it fails if the signs flip."""

import pytest

from helpers_tiny_lm import make_pairs, one_thread, save_tiny_model, write_jsonl
from pyalign.tasks.preference.rounds import run_sequential

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("apo")
    model = save_tiny_model(root / "pi0", seed=0)
    train = write_jsonl(root / "train.jsonl", make_pairs(16, seed=0, marker="bright"))
    held_out = write_jsonl(root / "eval.jsonl", make_pairs(8, seed=5, marker="bright"))
    results = {}
    for loss in ("apo_zero", "apo_down"):
        config = {
            "model": {"path": str(model)},
            "rounds": [{"name": "marker", "train": str(train), "eval": str(held_out)}],
            "method": {"loss": loss, "beta": 0.1},
            "lora": {"target_modules": ["q_proj", "v_proj"]},
            "training": {"lr": 5e-3, "epochs": 3, "batch_size": 4, "max_length": 32, "max_prompt_length": 16,
                         "log_every": 1, "save_every": 0, "progress_bar": False, "tensorboard": False},
            "output_dir": str(root / loss),
        }
        results[loss] = run_sequential(config).metrics[0]
    return results


def mean_over_training(metrics, name):
    values = [entry[name] for entry in metrics["history"]]
    return sum(values) / len(values)


def test_apo_zero_raises_the_chosen_likelihood(runs):
    metrics = runs["apo_zero"]
    assert mean_over_training(metrics, "chosen_reward") > 0
    assert mean_over_training(metrics, "rejected_reward") < 0
    assert metrics["eval"]["chosen_reward"] > 0 > metrics["eval"]["rejected_reward"]


def test_apo_down_lowers_the_chosen_likelihood_and_the_rejected_more(runs):
    metrics = runs["apo_down"]
    assert mean_over_training(metrics, "chosen_reward") < 0
    assert metrics["history"][-1]["rejected_reward"] < metrics["history"][-1]["chosen_reward"] < 0
    assert metrics["eval"]["rejected_reward"] < metrics["eval"]["chosen_reward"] < 0
