"""pyalign.reward_model: metrics against hand-computed values, the 0-100 rescaling, bad ratings,
pooling, scoring, save/load, a tiny model that learns synthetic ratings through
``pyalign train`` (task: reward_model) to a measured held-out accuracy, and HelpSteer2 rating
records with a multi-turn prompt exported, trained on and scored."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers_tiny_lm import WORDS, one_thread, save_tiny_model

from pyalign.reward_model import (
    ObjectiveScale, RewardModel, evaluate_reward_model, load_rated_examples, load_reward_model, objective_metrics, pairwise_accuracy,
    pearson, resolve_scales,
)
from pyalign.reward_model.data import RatingsDataset, check_within_scales
from pyalign.reward_model.model import last_non_padding_index

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
OBJECTIVES = ["helpfulness", "verbosity"]


# ----------------------------------------------------------------------------- metrics

def test_metrics_match_hand_computed_values():
    predictions = torch.tensor([[10.0], [20.0], [30.0], [25.0], [40.0], [40.0], [0.0]])
    targets = torch.tensor([[0.0], [50.0], [40.0], [25.0], [60.0], [80.0], [90.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    result = objective_metrics(predictions, targets, groups, ["h"])["h"]
    # mse: (10^2 + 30^2 + 10^2 + 0 + 20^2 + 40^2 + 90^2) / 7
    assert result["mse"] == pytest.approx((100 + 900 + 100 + 0 + 400 + 1600 + 8100) / 7)
    # group 0: pairs (0,1) (0,2) (1,2): true 0<50, 0<40, 50>40; predicted 10<20 ok, 10<30 ok, 20<30 wrong
    # group 1: (3,4) ok, (3,5) ok, (4,5): true 60<80, predicted tie -> 1/2; group 2: one example
    assert result["pairs"] == 6
    assert result["pairwise_accuracy"] == pytest.approx((2 + 2 + 0.5) / 6)
    p, y = predictions[:, 0].tolist(), targets[:, 0].tolist()
    mp, my = sum(p) / 7, sum(y) / 7
    expected_r = sum((a - mp) * (b - my) for a, b in zip(p, y)) / math.sqrt(
        sum((a - mp) ** 2 for a in p) * sum((b - my) ** 2 for b in y))
    assert result["pearson"] == pytest.approx(expected_r)
    # same true rating: not a pair; constant predictions: Pearson undefined
    assert pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 5.0]), torch.tensor([0, 0]))[1] == 0
    assert math.isnan(pearson(torch.tensor([3.0, 3.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="^predictions"):
        objective_metrics(predictions, targets[:, :0], groups, ["h"])


# ----------------------------------------------------------------------------- data

def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rescaling_to_100_and_scales():
    scale = ObjectiveScale("helpfulness", 0, 4)
    assert scale.to_100(3.0) == 75.0 and scale.from_100(75.0) == 3.0
    examples = [type("E", (), {"ratings": {"a": v, "b": 1.0}})() for v in (2.0, 6.0, 4.0)]
    inferred = resolve_scales({"a": None, "b": [0, 2]}, examples)
    assert inferred == [ObjectiveScale("a", 2.0, 6.0), ObjectiveScale("b", 0.0, 2.0)]
    with pytest.raises(ValueError, match=r"^objectives\.b: cannot infer"):
        resolve_scales(["b"], examples)
    with pytest.raises(ValueError, match=r"^objectives\.x: expected low < high"):
        ObjectiveScale("x", 1, 1)
    with pytest.raises(ValueError, match=r"example 2: ratings\.a = 6\.0 is outside its scale \[0, 4\]"):
        check_within_scales(examples, [ObjectiveScale("a", 0, 4)], "train.jsonl")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "response": "r", "ratings": {"helpfulness": 1}}, r":2: ratings is missing objective 'verbosity'"),
    ('{"prompt": "p", "response": "r", "ratings": {"helpfulness": NaN, "verbosity": 1}}',
     r":2: ratings\.helpfulness must be finite, got nan"),
    ('{"prompt": "p", "response": "r", "ratings": {"helpfulness": 1, "verbosity": Infinity}}',
     r":2: ratings\.verbosity must be finite"),
    ({"prompt": "p", "response": "r", "ratings": {"helpfulness": "high", "verbosity": 1}},
     r":2: ratings\.helpfulness must be a number, got 'high'"),
    ({"prompt": "p", "response": "r", "ratings": {"helpfulness": True, "verbosity": 1}}, r"ratings\.helpfulness must be a number"),
    ({"prompt": "p", "response": "r"}, r":2: field 'ratings' must be an object"),
    ({"prompt": "p", "response": "r", "ratings": {}, "score": 1}, r":2: unknown field 'score'"),
    ({"prompt": "p", "ratings": {"helpfulness": 1, "verbosity": 1}}, r":2: missing field 'response'"),
    ({"prompt": "p", "response": "r", "system": 3, "ratings": {}}, r":2: field 'system' must be a string"),
    ({"prompt": 3, "response": "r", "ratings": {}}, r":2: field 'prompt' must be a string or a list of chat messages"),
    ({"prompt": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], "response": "r",
      "ratings": {}}, r":2: field 'prompt' must end with the user's turn, ends with 'assistant'"),
    ({"prompt": [{"role": "human", "content": "p"}], "response": "r", "ratings": {}},
     r":2: field 'prompt'\[0\]\.role must be one of system, user, assistant, got 'human'"),
])
def test_bad_ratings_name_line_and_field(tmp_path, row, message):
    good = {"prompt": "p", "response": "r", "ratings": {"helpfulness": 1, "verbosity": 2, "extra": 5}}
    path = write_rows(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=message):
        load_rated_examples(path, OBJECTIVES)


def test_extra_ratings_are_ignored_and_blank_lines_skipped(tmp_path):
    path = write_rows(tmp_path / "ok.jsonl", [
        {"prompt": "p", "response": "r", "system": "s", "ratings": {"verbosity": 2, "helpfulness": 1.5, "extra": 9}}, ""])
    [example] = load_rated_examples(path, OBJECTIVES)
    assert example.ratings == {"helpfulness": 1.5, "verbosity": 2.0} and example.system == "s"
    with pytest.raises(ValueError, match="no rated examples"):
        load_rated_examples(write_rows(tmp_path / "empty.jsonl", [""]), OBJECTIVES)


def test_last_non_padding_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_non_padding_index(mask).tolist() == [2, 4, 4]


# ----------------------------------------------------------------------------- model

def synthetic_rows(num_prompts: int, seed: int) -> list[dict]:
    """Four responses per prompt; helpfulness 0-4 = whether the response says "good" (4 or 0),
    verbosity = its number of words (1-12): a tiny model can read both."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w != "good"]
    rows = []
    for _ in range(num_prompts):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
        for _ in range(4):
            length = rng.randint(1, 12)
            response = [rng.choice(words) for _ in range(length)]
            good = rng.random() < 0.5
            if good:
                response[rng.randrange(length)] = "good"
            rows.append({"prompt": prompt, "response": " ".join(response),
                         "ratings": {"helpfulness": 4.0 if good else 0.0, "verbosity": float(length)}})
    return rows


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rm") / "tiny", seed=0)


def fresh_model(folder, seed=0):
    model = RewardModel.from_backbone(folder, [ObjectiveScale("helpfulness", 0, 4), ObjectiveScale("verbosity", 0, 12)],
                                      offset=[50.0, 40.0], spread=[40.0, 30.0], max_length=64, max_prompt_length=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a random head, so that scores differ between texts
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))
        model.head.bias.copy_(torch.randn(2, generator=generator))
    return model


def test_score_is_forward_on_the_policy_tokens_in_any_batching(tiny_backbone):
    from pyalign.data import encode_prompt, encode_response

    model = fresh_model(tiny_backbone)
    rows = synthetic_rows(3, seed=1)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    scores = model.score(prompts, responses, system="be good", batch_size=5)
    assert scores.shape == (12, 2) and scores.dtype == torch.float32
    assert torch.allclose(model.score(prompts, responses, system="be good", batch_size=1), scores, atol=1e-4)
    ids = encode_prompt(model.tokenizer, prompts[0], "be good") + encode_response(model.tokenizer, responses[0])
    with torch.no_grad():
        direct = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert torch.allclose(direct[0], scores[0], atol=1e-4)
    assert not torch.allclose(model.score(prompts, responses, batch_size=5), scores)  # the system prompt counts
    with pytest.raises(ValueError, match="^responses: expected one per prompt"):
        model.score(prompts, responses[:-1])
    with pytest.raises(ValueError, match=r"^responses\[0\]"):
        model.score(prompts[:1], [None])


def test_save_load_round_trip_and_objective_checks(tiny_backbone, tmp_path):
    import peft

    from pyalign.reward_model.model import apply_backbone_lora
    from pyalign.train import LoraConfig

    model = fresh_model(tiny_backbone, seed=1)
    model.backbone = apply_backbone_lora(model.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():  # a non-zero LoRA, so that merging matters
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert isinstance(model.backbone, peft.PeftModel)
    rows = synthetic_rows(2, seed=2)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    before = model.score(prompts, responses)
    folder = model.save(tmp_path / "rm")
    assert sorted(p.name for p in folder.iterdir()) == ["backbone", "checksums.json", "head.safetensors",
                                                        "reward_model.json"]
    assert not (tmp_path / "rm.partial").exists()
    loaded = load_reward_model(folder, objectives=OBJECTIVES)
    assert loaded.objectives == OBJECTIVES and loaded.scales == model.scales
    assert torch.allclose(loaded.score(prompts, responses), before, atol=1e-4)
    assert torch.allclose(model.score(prompts, responses), before, atol=1e-4)  # merged in place: same function
    with pytest.raises(ValueError, match=r"^objectives: expected the reward model's objectives \['helpfulness', "
                                         r"'verbosity'\] \(.*rm\), got \['verbosity', 'helpfulness'\]"):
        load_reward_model(folder, objectives=["verbosity", "helpfulness"])
    with pytest.raises(ValueError, match="^reward_model: .* is not a pyalign reward model folder"):
        load_reward_model(tiny_backbone)


# ----------------------------------------------------------------------------- pyalign train

def reward_config(tmp_path, folder, **overrides):
    train = write_rows(tmp_path / "train.jsonl", synthetic_rows(30, seed=0))
    held_out = write_rows(tmp_path / "eval.jsonl", synthetic_rows(15, seed=1))
    config = {
        "task": "reward_model",
        "model": {"path": str(folder)},
        "objectives": {"helpfulness": [0, 4], "verbosity": None},
        "data": {"train": str(train), "eval": str(held_out)},
        "output_dir": str(tmp_path / "out"),
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1e-2, "epochs": 10, "batch_size": 16, "max_length": 64, "max_prompt_length": 32,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "device": "cpu", "save_every": 8,
                     "log_every": 5, "progress_bar": False, "tensorboard": False},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def test_pyalign_train_learns_synthetic_ratings_resumes_and_refuses_stale_runs(tiny_backbone, tmp_path):
    from pyalign.tasks.reward_model.run import run_reward_model

    config = reward_config(tmp_path, tiny_backbone)
    result = run_reward_model(config)
    heldout = result.heldout
    # measured (seeds 0-3): helpfulness pairwise accuracy 1.00; verbosity Pearson 0.76-0.92, pairwise
    # accuracy 0.78-0.93 (an untrained head predicts the training mean: accuracy 0.5)
    assert heldout["helpfulness"]["pairwise_accuracy"] > 0.9 and heldout["helpfulness"]["pairs"] > 20
    assert heldout["verbosity"]["pearson"] > 0.6 and heldout["verbosity"]["pairwise_accuracy"] > 0.7
    saved = json.loads((result.model_dir / "reward_model.json").read_text())
    assert saved["objectives"][1] == {"name": "verbosity", "low": 1.0, "high": 12.0}  # inferred from train
    assert saved["validation"]["helpfulness"]["pairwise_accuracy"] == heldout["helpfulness"]["pairwise_accuracy"]
    # the saved model scores the held-out data as the validation did
    loaded = load_reward_model(result.model_dir)
    rows = [json.loads(line) for line in open(config["data"]["eval"])]
    scores = loaded.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    targets = torch.tensor([[100 * r["ratings"]["helpfulness"] / 4, 100 * (r["ratings"]["verbosity"] - 1) / 11]
                            for r in rows])
    groups = torch.tensor([i // 4 for i in range(len(rows))])
    again = objective_metrics(scores, targets, groups, OBJECTIVES)
    assert again["helpfulness"]["mse"] == pytest.approx(heldout["helpfulness"]["mse"], rel=1e-3)
    from_file = evaluate_reward_model(loaded, config["data"]["eval"], batch_size=7)
    for name in OBJECTIVES:
        assert from_file[name]["pairs"] == heldout[name]["pairs"]
        assert from_file[name]["pearson"] == pytest.approx(heldout[name]["pearson"], abs=1e-4)
    # killed mid-run (after the step-8 checkpoint), rerun: the same result as uninterrupted
    def crash(event, info):
        if info["step"] == 11:
            raise KeyboardInterrupt("killed")

    crashed = {**config, "output_dir": str(tmp_path / "crashed")}
    with pytest.raises(KeyboardInterrupt):
        run_reward_model(crashed, callback=crash)
    assert not (tmp_path / "crashed" / "reward_model").exists()
    assert run_reward_model(crashed).heldout == heldout
    # a finished run is not redone; one with another scale is refused
    assert run_reward_model(config).heldout == heldout
    with pytest.raises(RuntimeError, match="different settings"):
        run_reward_model({**config, "objectives": {"helpfulness": [0, 5], "verbosity": None}})


def test_config_errors_name_the_field(tiny_backbone, tmp_path):
    from pyalign.train import ConfigError, load_config

    base = reward_config(tmp_path, tiny_backbone)
    for objectives, message in [
        ([], r"^objectives: expected a non-empty list"), ({"h": [1, 0]}, r"^objectives\.h: expected low < high"),
        ({"h": [0, "x"]}, r"^objectives\.h\[1\]"), (["a", "a"], "distinct"), (3, "^objectives"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "objectives": objectives})
    with pytest.raises(ConfigError, match=r"^data\.eval: file not found"):
        load_config({**base, "data": {"train": base["data"]["train"], "eval": str(tmp_path / "nope.jsonl")}})
    from pyalign.tasks.reward_model.run import run_reward_model

    with pytest.raises(ValueError, match="ratings is missing objective 'harmlessness'"):
        run_reward_model({**base, "objectives": ["helpfulness", "harmlessness"]})
    rows = synthetic_rows(2, seed=3)
    rows[1]["ratings"]["helpfulness"] = 7
    bad = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"ratings\.helpfulness = 7\.0 is outside its scale \[0\.0, 4\.0\]"):
        run_reward_model({**base, "data": {"train": str(bad)}})


def test_ratings_dataset_targets_and_groups(tiny_backbone):
    from pyalign.reward_model.data import RatedExample
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    examples = [RatedExample("a b", "c", {"h": 1.0}), RatedExample("a b", "c d", {"h": 3.0}),
                RatedExample("a b", "c", {"h": 2.0}, system="s")]
    data = RatingsDataset(examples, [ObjectiveScale("h", 1, 3)], tokenizer, 32, 16)
    batch = data.batch([0, 1, 2])
    assert batch["targets"].tolist() == [[0.0], [100.0], [50.0]]
    assert batch["group"].tolist() == [0, 0, 1]  # another system prompt: another group
    assert batch["attention_mask"].sum(-1).tolist() == [len(item.input_ids) for item in data.items]


# ----------------------------------------------------------------------------- multi-turn prompts (HelpSteer2)

HELPSTEER2 = Path(__file__).parent / "fixtures" / "data" / "helpsteer2"
HELPSTEER_OBJECTIVES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def test_helpsteer2_export_with_multi_turn_prompts_trains_and_scores(tmp_path):
    """Rating records exported by ``pyalign data export --ratings`` from the HelpSteer2 layout
    (one prompt multi-turn) load, train the reward model on a tiny backbone, and score: a
    conversation is read through the chat template as messages, as the policy's data is."""
    from pyalign.data import encode_prompt, encode_response
    from pyalign.data.cli import main as data_cli
    from pyalign.reward_model.data import prompt_groups
    from pyalign.tasks.reward_model.run import run_reward_model

    train, held_out = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    assert data_cli(["export", str(HELPSTEER2), "--ratings", "--out", str(train)]) == 0
    assert data_cli(["export", str(HELPSTEER2), "--ratings", "--split", "validation", "--out", str(held_out)]) == 0
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    multi = [i for i, row in enumerate(rows) if isinstance(row["prompt"], list)]
    assert multi == [4, 5] and [m["role"] for m in rows[4]["prompt"]] == ["user", "assistant", "user"]

    examples = load_rated_examples(train, HELPSTEER_OBJECTIVES)
    assert examples[4].prompt == tuple(rows[4]["prompt"]) and isinstance(examples[0].prompt, str)
    assert prompt_groups([(e.system, e.prompt) for e in examples]) == [0, 0, 1, 1, 2, 2, 3, 3]

    texts = [row["response"] for row in rows]
    for row in rows:
        texts += [row["prompt"]] if isinstance(row["prompt"], str) else [m["content"] for m in row["prompt"]]
    words = sorted({word for text in texts for word in text.split()} - set(WORDS))  # the tiny model's vocabulary
    folder = save_tiny_model(tmp_path / "tiny", seed=0, extra_tokens=words)
    config = {
        "task": "reward_model", "model": {"path": str(folder)},
        "objectives": {name: [0, 4] for name in HELPSTEER_OBJECTIVES},
        "data": {"train": str(train), "eval": str(held_out)}, "output_dir": str(tmp_path / "out"),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1e-2, "epochs": 20, "batch_size": 4, "max_length": 96, "max_prompt_length": 64,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "device": "cpu", "save_every": 100,
                     "log_every": 4, "progress_bar": False, "tensorboard": False},
    }
    result = run_reward_model(config)
    assert result.heldout["helpfulness"]["pairs"] == 1  # the validation split: one prompt, two answers

    model = load_reward_model(result.model_dir)
    scores = model.score([row["prompt"] for row in rows], [row["response"] for row in rows])
    # the conversation's tokens are the policy's, in training (the dataset) and in scoring
    ids = encode_prompt(model.tokenizer, rows[4]["prompt"]) + encode_response(model.tokenizer, rows[4]["response"])
    dataset = RatingsDataset(examples, model.scales, model.tokenizer, 96, 64)
    assert dataset.items[4].input_ids == ids
    with torch.no_grad():
        direct = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    assert torch.allclose(direct, scores[4], atol=1e-4)
    last_turn_only = model.score([rows[4]["prompt"][-1]["content"]], [rows[4]["response"]])[0]
    assert not torch.allclose(last_turn_only, scores[4], atol=1e-3), "the earlier turns must be read"
    # trained (40 steps): on its training rows it beats the untrained model (the training mean,
    # MSE = the targets' variance) by far; measured 0.07-0.29 x the variance per objective
    assert scores[4, 0] > scores[5, 0]  # the better answer to the conversation (helpfulness 4 vs 1)
    metrics = evaluate_reward_model(model, str(train))
    targets = torch.tensor([[100 * row["ratings"][name] / 4 for name in HELPSTEER_OBJECTIVES] for row in rows])
    for k, name in enumerate(HELPSTEER_OBJECTIVES):
        assert metrics[name]["mse"] < 0.5 * targets[:, k].var(unbiased=False).item(), name
    assert metrics["helpfulness"]["pairs"] == 3  # groups 0, 2, 3 differ in helpfulness, group 1 ties
