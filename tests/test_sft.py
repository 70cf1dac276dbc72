"""Supervised fine-tuning on a tiny random Llama: the data (prompt tokens ignored), the
token-normalised NLL against the float64 reference, token-weighted gradient accumulation, a
micro-batch without response tokens contributing nothing, and the `sft` task end to end
(outputs, crash + resume == uninterrupted, finished runs skipped or refused)."""

import copy
import json

import pytest
import torch
from helpers_tiny_lm import (
    Crash, make_model, make_tokenizer, one_thread, random_sentence, save_tiny_model, write_jsonl,
)

from pyalign.data import IGNORE_INDEX, encode_prompt, encode_response
from pyalign.reference import reference_token_logprobs
from pyalign.train import LoraConfig, TrainingConfig
from pyalign.models import apply_lora
from pyalign.train.objectives import SFTObjective
from pyalign.tasks.sft.run import run_sft
from pyalign.tasks.sft.data import SFTDataset, SFTExample, load_sft_examples
from pyalign.train.trainer import Trainer

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def make_examples(n, seed=0):
    import random

    rng = random.Random(seed)
    return [{"prompt": random_sentence(rng, 2, 7), "response": random_sentence(rng, 1, 9)} for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return SFTDataset([SFTExample(**e) for e in make_examples(10, seed=1)], tokenizer, 32, 16)


def lora_model(tokenizer, seed=0):
    model = apply_lora(make_model(len(tokenizer), seed=seed), LoraConfig(target_modules=["q_proj", "v_proj"]), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter do something
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def training(**overrides):
    base = dict(lr=1e-2, epochs=1, batch_size=4, max_length=32, max_prompt_length=16, warmup_ratio=0.0,
                progress_bar=False, tensorboard=False, save_every=0, log_every=1, seed=0)
    return TrainingConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- data

def test_examples_tokenise_like_pairs_and_only_responses_are_labelled(tokenizer, dataset):
    batch = dataset.batch([0, 3])
    example = dataset.examples[3]
    prompt, response = encode_prompt(tokenizer, example.prompt), encode_response(tokenizer, example.response)
    row = batch["input_ids"][1]
    assert row[: len(prompt) + len(response)].tolist() == prompt + response
    assert (batch["labels"][1, : len(prompt)] == IGNORE_INDEX).all()
    assert batch["labels"][1, len(prompt) : len(prompt) + len(response)].tolist() == response
    assert (batch["labels"][1, len(prompt) + len(response) :] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == len(prompt) + len(response)
    assert batch["index"].tolist() == [0, 3]


def test_truncation_keeps_the_prompt_tail_and_cuts_the_response(tokenizer):
    long = SFTExample(" ".join(["cat"] * 30) + " dog", " ".join(["sun"] * 30))
    data = SFTDataset([long], tokenizer, max_length=20, max_prompt_length=8)
    tokenized = data.tokenized[0]
    assert len(tokenized.prompt_ids) == 8 and len(tokenized.prompt_ids) + len(tokenized.response_ids) == 20
    assert tokenized.prompt_ids == encode_prompt(tokenizer, long.prompt)[-8:]


def test_sft_file_errors_name_line_and_field(tmp_path):
    good = {"prompt": "the cat", "response": "a dog"}
    cases = [
        ({"prompt": "the cat"}, r":2: missing field 'response'"),
        ({**good, "chosen": "x"}, r":2: unknown field 'chosen'"),
        ({**good, "response": 3}, r":2: field 'response' must be"),
        ({**good, "prompt": [{"role": "assistant", "content": "hi"}]}, r":2: field 'prompt' must end with the user's turn"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(ValueError, match=message):
            load_sft_examples(path)
    rated = write_jsonl(tmp_path / "rated.jsonl", [{**good, "ratings": {"helpfulness": 3}}])
    with pytest.raises(ValueError, match="unknown field 'ratings'"):
        load_sft_examples(rated)
    assert load_sft_examples(rated, ignore_fields=("ratings",)) == [SFTExample("the cat", "a dog")]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "system", "content": "be kind"},
                                                             {"role": "user", "content": "the cat"}],
                                                  "response": "a dog"}])
    assert load_sft_examples(chat) == [SFTExample("the cat", "a dog", "be kind")]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no SFT examples"):
        load_sft_examples(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- the objective

@pytest.mark.parametrize("fused", ["auto", False], ids=["fused_lm_head", "logits"])
def test_sft_loss_is_token_normalised_nll_of_the_float64_reference(tokenizer, dataset, fused):
    model = lora_model(tokenizer)
    batch = dataset.batch([0, 4, 7])
    out = SFTObjective(fused=fused).loss(model, batch)
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = reference_token_logprobs(logits[:, :-1], batch["labels"][:, 1:])
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    expected = -per_token.sum() / tokens
    assert SFTObjective().units(batch) == int(tokens)
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert out.metrics["loss"] == out.loss.item()


def step_gradients(trainer, step=0):
    trainer.optimizer_step(step)  # leaves the step's gradients in .grad (max_grad_norm=None)
    return torch.cat([p.grad.flatten() for p in trainer.params.values()])


def test_accumulation_weights_micro_batches_by_their_tokens(tokenizer, dataset):
    """Micro-batches of different token counts: the step equals one batch of their union."""
    grads = []
    for batch_size, accum in [(8, 1), (2, 4), (3, 3)]:
        trainer = Trainer(lora_model(tokenizer), SFTObjective(), dataset,
                          training(batch_size=batch_size, grad_accum=accum, max_grad_norm=None), "unused")
        if batch_size == 3:  # 3 + 3 + 2 pairs: the same 8 examples as the others' first step
            assert [len(m) for m in trainer.micro_batches_of_step(0)] == [3, 3, 3]
            continue
        grads.append(step_gradients(trainer))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


class MaskedResponses:
    """A dataset whose chosen examples have every label ignored (e.g. fully truncated)."""

    def __init__(self, dataset, masked):
        self.dataset, self.masked = dataset, set(masked)

    def __len__(self):
        return len(self.dataset)

    def batch(self, indices):
        batch = self.dataset.batch(indices)
        for row, index in enumerate(indices):
            if index in self.masked:
                batch["labels"][row] = IGNORE_INDEX
        return batch


def test_micro_batch_without_response_tokens_contributes_nothing(tokenizer, dataset, caplog):
    config = training(batch_size=2, grad_accum=2, max_grad_norm=None)
    probe = Trainer(lora_model(tokenizer), SFTObjective(), dataset, config, "unused")
    first, second = (m.tolist() for m in probe.micro_batches_of_step(0))
    masked = Trainer(lora_model(tokenizer), SFTObjective(), MaskedResponses(dataset, second), config, "unused")
    got = step_gradients(masked)
    assert torch.isfinite(got).all()

    alone = Trainer(lora_model(tokenizer), SFTObjective(), dataset, config, "unused")
    alone.loss_on_batch(dataset.batch(first)).loss.backward()
    expected = torch.cat([p.grad.flatten() for p in alone.params.values()])
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-5)

    nothing = Trainer(lora_model(tokenizer), SFTObjective(), MaskedResponses(dataset, range(len(dataset))),
                      config, "unused")
    before = {name: p.detach().clone() for name, p in nothing.params.items()}
    metrics = nothing.optimizer_step(0)
    assert "no tokens in the step's batches on any process; no update" in caplog.text
    assert all(torch.equal(before[name], p) for name, p in nothing.params.items())
    assert "loss" not in metrics  # no unit to average over


# ----------------------------------------------------------------------------- the sft task

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_assets")
    model = save_tiny_model(root / "base")
    train = write_jsonl(root / "train.jsonl", make_examples(10, seed=2))
    held_out = write_jsonl(root / "eval.jsonl", make_examples(4, seed=3))
    return model, train, held_out


def sft_config(assets, output_dir, **training_overrides):
    model, train, held_out = assets
    return {
        "task": "sft",
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(held_out)},
        "lora": {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "training": {"lr": 1e-2, "epochs": 2, "batch_size": 2, "grad_accum": 2, "max_length": 32,
                     "max_prompt_length": 16, "save_every": 2, "log_every": 1, "progress_bar": False,
                     "tensorboard": False, "device": "cpu", **training_overrides},
        "output_dir": str(output_dir),
    }


def test_sft_run_crash_resume_and_finished(assets, tmp_path):
    straight = run_sft(sft_config(assets, tmp_path / "a"))
    out = tmp_path / "a"
    assert {"model", "adapter", "metrics.json", "state.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "config.json").read_text())["task"] == "sft"
    assert straight.metrics["eval"]["perplexity"] > 1 and straight.model_dir == out / "model"
    assert len(straight.metrics["history"]) == 6  # 10 examples / (2 x 2) -> 3 steps x 2 epochs

    config = sft_config(assets, tmp_path / "b")

    def crash(event, info):
        if event == "step" and info["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run_sft(config, callback=crash)
    steps = []
    resumed = run_sft(config, callback=lambda event, info: steps.append(info["step"]))
    assert steps == [3, 4, 5, 6]  # from the checkpoint at step 2
    from safetensors.torch import load_file

    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed.metrics["eval"] == straight.metrics["eval"]

    steps.clear()
    run_sft(config, callback=lambda event, info: steps.append(info["step"]))
    assert steps == []  # finished: nothing redone
    config["training"]["lr"] = 5e-3
    with pytest.raises(RuntimeError, match="the SFT run was finished under different settings"):
        run_sft(config)


@pytest.mark.gpu
def test_sft_on_cuda_with_bf16_autocast_is_close_to_cpu(assets, tmp_path):
    cpu = run_sft(sft_config(assets, tmp_path / "cpu", epochs=1))
    gpu = run_sft(sft_config(assets, tmp_path / "gpu", epochs=1, device="cuda"))  # mixed_precision auto: bf16
    for a, b in zip(cpu.metrics["history"], gpu.metrics["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert gpu.metrics["eval"]["loss"] == pytest.approx(cpu.metrics["eval"]["loss"], rel=3e-2)
