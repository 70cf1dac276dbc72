"""The trainer with the preference objective on a tiny random Llama: loss against the float64
reference, which parameters a step touches, gradient accumulation, merging the LoRA, checkpoint
round trip, changing spo's alphas between steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_tiny_lm import make_model, make_pairs, make_tokenizer, one_thread

from pyalign.data import PreferenceDataset, PreferencePair
from pyalign.reference import reference_token_logprobs
from pyalign.tasks.preference import MethodConfig
from pyalign.train import LoraConfig, TrainingConfig
from pyalign.train.logprob_cache import FrozenLogprobs, PairsWithFrozenLogprobs, dataset_logprobs
from pyalign.models import (
    apply_lora, enable_activation_checkpointing, load_model, policy_sequence_logprobs, save_merged_model,
)
from pyalign.train.objectives import PreferenceObjective
from pyalign.train.trainer import Trainer

MARKER = "bright"
single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    pairs = [PreferencePair(**p) for p in make_pairs(12, seed=3, marker=MARKER)]
    return PreferenceDataset(pairs, tokenizer, max_length=32, max_prompt_length=16)


def lora_model(tokenizer, trainable_tokens=None, seed=0):
    model = make_model(len(tokenizer), seed=seed)
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], trainable_token_indices=trainable_tokens)
    return apply_lora(model, lora, seed=seed)


def random_chain(n_models, n_pairs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    chosen = -20 + 3 * torch.randn(n_models, n_pairs, generator=generator)
    rejected = -20 + 3 * torch.randn(n_models, n_pairs, generator=generator)
    return FrozenLogprobs(chosen, rejected)


def training(**overrides):
    base = dict(lr=1e-2, epochs=1, batch_size=4, max_length=32, max_prompt_length=16, warmup_ratio=0.0,
                progress_bar=False, tensorboard=False, save_every=0, log_every=1, seed=0)
    return TrainingConfig(**{**base, **overrides})


def objective(alphas=(), **method):
    return PreferenceObjective.from_method(MethodConfig(**method), list(alphas))


def make_trainer(model, dataset, chain, method_objective, directory="unused", **overrides):
    return Trainer(model, method_objective, PairsWithFrozenLogprobs(dataset, chain), training(**overrides), directory)


def perturb_lora(model, seed=1):
    """LoRA's B starts at zero; make the adapter do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def reference_sequence_logprobs(model, batch):
    """The eager float64 path: float64 model copy, reference op, sum over response tokens."""
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = reference_token_logprobs(logits[:, :-1], batch["labels"][:, 1:])
    return per_token.sum(-1)


@pytest.mark.parametrize("loss", ["dpo", "spo"])
def test_trainer_loss_equals_float64_reference(tokenizer, dataset, loss):
    model = lora_model(tokenizer)
    perturb_lora(model)
    beta, alpha = 0.1, 0.3
    alphas = [alpha] if loss == "spo" else []
    chain = random_chain(len(alphas) + 1, len(dataset))
    trainer = make_trainer(model, dataset, chain, objective(alphas, loss=loss, beta=beta, alpha=alpha))
    batch = trainer.train_data.batch([0, 5, 7, 2])
    out = trainer.loss_on_batch(batch)

    logps = reference_sequence_logprobs(model, batch)
    chosen, rejected = logps[:4], logps[4:]
    index = batch["index"]
    if loss == "dpo":
        z = beta * ((chosen - chain.chosen[0, index].double()) - (rejected - chain.rejected[0, index].double()))
    else:  # round n=2: R = beta*log(pi_2/pi_1) - beta*alpha*log(pi_1/pi_0)
        def reward(policy, frozen):
            frozen = frozen[:, index].double()
            return beta * (policy - frozen[1]) - beta * alpha * (frozen[1] - frozen[0])
        z = reward(chosen, chain.chosen) - reward(rejected, chain.rejected)
    expected = -F.logsigmoid(z).mean()
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert out.metrics["reward_accuracy"] == (z > 0).double().mean().item()
    assert out.metrics["loss"] == out.loss.item()


def test_nll_term_is_added(tokenizer, dataset):
    model = lora_model(tokenizer)
    chain = random_chain(1, len(dataset))
    plain = make_trainer(model, dataset, chain, objective(loss="dpo"))
    with_nll = make_trainer(model, dataset, chain, objective(loss="dpo", nll_weight=0.5))
    batch = plain.train_data.batch([1, 3])
    logps = reference_sequence_logprobs(model, batch)
    tokens = (batch["labels"][:, 1:] != -100).sum(-1)
    nll = (-logps[:2] / tokens[:2]).mean().item()
    difference = with_nll.loss_on_batch(batch).loss.item() - plain.loss_on_batch(batch).loss.item()
    assert abs(difference - 0.5 * nll) < 1e-5


def test_sdpo_objective_equals_dpo():
    """spo with every alpha zero runs on pi_{n-1} alone and is DPO from it."""
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(8, generator=generator, dtype=torch.float64) - 10
    chain = torch.randn(1, 8, generator=generator, dtype=torch.float64) - 10
    tokens = torch.full((8,), 5)
    spo = objective([], loss="spo", alpha=0.0).from_sequence_logprobs(policy, chain, tokens)
    dpo = objective([], loss="dpo").from_sequence_logprobs(policy, chain, tokens)
    assert torch.allclose(spo.loss, dpo.loss, rtol=0, atol=1e-12)


def test_step_changes_only_trainable_parameters(tokenizer, dataset):
    new_tokens = [tokenizer.convert_tokens_to_ids(MARKER), 7]
    model = lora_model(tokenizer, trainable_tokens=new_tokens)
    perturb_lora(model)  # with LoRA's B at zero, A gets no gradient on the first step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, dataset, random_chain(1, len(dataset)), objective(loss="dpo"))
    trainer.optimizer_step(0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in name for name in trainable)
    assert any("trainable_tokens" in name for name in trainable)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name


def test_gradient_accumulation_equals_one_large_batch(tokenizer, dataset):
    grads = []
    for batch_size, accum in [(6, 1), (2, 3), (4, 2)]:  # (4, 2) has a short last micro-batch
        model = lora_model(tokenizer)
        perturb_lora(model)
        trainer = make_trainer(model, dataset, random_chain(1, len(dataset)), objective(loss="dpo"),
                               batch_size=batch_size, grad_accum=accum, max_grad_norm=None)
        micro = trainer.micro_batches_of_step(0)
        assert sum(len(m) for m in micro) == 6 if batch_size != 4 else 8
        if batch_size == 4:  # compare on the same 6 pairs: 4 + 2
            micro = [micro[0], micro[1][:2]]
        trainer.model.train()
        trainer.optimizer.zero_grad()
        pairs = sum(len(m) for m in micro)
        for indices in micro:
            out = trainer.loss_on_batch(trainer.train_data.batch(indices.tolist()))
            (out.loss * len(indices) / pairs).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params.values()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-4)


def test_data_order_is_seeded_and_covers_each_epoch(tokenizer, dataset):
    trainer = make_trainer(lora_model(tokenizer), dataset, random_chain(1, len(dataset)), objective(),
                           epochs=2, batch_size=5)
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6
    for epoch in range(2):
        steps = range(epoch * 3, epoch * 3 + 3)
        seen = torch.cat([b for s in steps for b in trainer.micro_batches_of_step(s)])
        assert sorted(seen.tolist()) == list(range(len(dataset)))
    assert not torch.equal(trainer.epoch_order(0), trainer.epoch_order(1))
    assert torch.equal(trainer.epoch_order(1), trainer.epoch_order(1))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_merged_model_reproduces_the_trained_policy(tokenizer, dataset, tmp_path, tied):
    """The next round's reference is the merged folder: it must compute what the adapter did,
    trained token rows included (with tied embeddings, as SmolLM2 has, they feed lm_head too)."""
    lora = LoraConfig(target_modules=["q_proj", "v_proj"],
                      trainable_token_indices=[tokenizer.convert_tokens_to_ids(MARKER)])
    model = apply_lora(make_model(len(tokenizer), tied=tied), lora, seed=0)
    perturb_lora(model)
    kwargs = dict(batch_size=4, device=torch.device("cpu"), mixed_precision="no", average=False)
    adapter_logps = dataset_logprobs(model, dataset, **kwargs)
    save_merged_model(model, tokenizer, tmp_path / "merged")
    merged = load_model(tmp_path / "merged", "float32", torch.device("cpu"))
    merged_logps = dataset_logprobs(merged, dataset, **kwargs)
    base_logps = dataset_logprobs(make_model(len(tokenizer), tied=tied), dataset, **kwargs)
    for adapted, reloaded, base in zip(adapter_logps, merged_logps, base_logps):
        assert torch.allclose(adapted, reloaded, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(adapted, base, atol=1e-2)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}


def test_policy_logprobs_at_init_equal_the_base_model(tokenizer, dataset):
    """LoRA starts as the identity: at step 0 policy == reference, so every reward starts at 0."""
    base = make_model(len(tokenizer))
    batch = dataset.batch([0, 1, 2])
    expected = policy_sequence_logprobs(base, batch)
    assert torch.equal(policy_sequence_logprobs(lora_model(tokenizer), batch), expected)


def test_checkpoint_round_trip_continues_identically(tokenizer, dataset, tmp_path):
    def trainer_for(directory):
        model = lora_model(tokenizer)
        return make_trainer(model, dataset, random_chain(1, len(dataset)), objective(loss="dpo"), directory,
                            epochs=2, lr_scheduler="cosine", warmup_ratio=0.2)

    straight = trainer_for(tmp_path / "a")
    for step in range(3):
        straight.optimizer_step(step)
    first = trainer_for(tmp_path / "b")
    first.optimizer_step(0)
    first.step = 1
    first.save()
    resumed = trainer_for(tmp_path / "b")
    assert resumed.restore() and resumed.step == 1
    for step in (1, 2):
        resumed.optimizer_step(step)
    for name, param in straight.params.items():
        assert torch.equal(param, resumed.params[name]), name


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, dataset):
    grads = []
    for checkpointing in (False, True):
        base = make_model(len(tokenizer))
        if checkpointing:
            enable_activation_checkpointing(base)
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        model = apply_lora(base, LoraConfig(target_modules=["q_proj", "v_proj"]), seed=0)
        perturb_lora(model)
        model.train()
        policy_sequence_logprobs(model, dataset.batch([0, 1, 2])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_loss_is_close_to_fp32(tokenizer, dataset):
    """The CUDA path's bf16 autocast, exercised on CPU (mixed_precision: bf16)."""
    model = lora_model(tokenizer)
    perturb_lora(model)
    chain = random_chain(1, len(dataset))
    losses = {}
    for precision in ("no", "bf16"):
        trainer = make_trainer(model, dataset, chain, objective(loss="dpo"), mixed_precision=precision)
        losses[precision] = trainer.loss_on_batch(trainer.train_data.batch([0, 1, 2, 3])).loss.item()
    assert losses["bf16"] == pytest.approx(losses["no"], abs=2e-2)
    assert losses["bf16"] != losses["no"]  # autocast really ran


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "robust", "apo_zero", "apo_down", "kto_pair", "spo"])
def test_every_loss_trains_a_step(tokenizer, dataset, loss):
    smoothing = 0.1 if loss in ("dpo", "robust") else 0.0
    alphas = [0.1, 0.2] if loss == "spo" else []
    model = lora_model(tokenizer)
    perturb_lora(model)
    trainer = make_trainer(model, dataset, random_chain(len(alphas) + 1, len(dataset)),
                           objective(alphas, loss=loss, nll_weight=0.1, label_smoothing=smoothing))
    assert trainer.objective.average == (loss == "ipo")
    before = {name: p.detach().clone() for name, p in trainer.params.items()}
    metrics = trainer.optimizer_step(0)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and "nll" in metrics
    assert any(not torch.equal(before[name], p) for name, p in trainer.params.items())


def test_chain_of_the_wrong_shape_is_refused(tokenizer, dataset):
    spo_round_3 = objective([0.1, 0.1], loss="spo")  # needs pi_0, pi_1, pi_2
    with pytest.raises(ValueError, match=r"data.train_chain: expected frozen log-probs of shape \(3, 12\)"):
        make_trainer(lora_model(tokenizer), dataset, random_chain(2, len(dataset)), spo_round_3)


def test_a_step_callback_changes_spo_alphas_and_a_resumed_run_keeps_them(tokenizer, dataset, tmp_path):
    """Adaptive alpha's hook: the callback sets new alphas between steps; they take effect at
    the next step, are saved in the checkpoint and restored on resume."""
    chain = random_chain(2, len(dataset))

    def run(directory, crash_at=None):
        model = lora_model(tokenizer)
        perturb_lora(model)
        seen = []

        def callback(event, info):
            trainer = info["trainer"]
            seen.append(list(trainer.objective.alphas))
            if info["step"] == 1:
                trainer.objective.set_alphas([0.6])
            if info["step"] == crash_at:
                raise KeyboardInterrupt
        trainer = Trainer(model, objective([0.1], loss="spo"), PairsWithFrozenLogprobs(dataset, chain),
                          training(epochs=2, batch_size=3, save_every=2), directory, callback=callback)
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
        return trainer, seen

    straight, seen = run(tmp_path / "a")
    assert seen == [[0.1]] + [[0.6]] * 7
    run(tmp_path / "b", crash_at=3)
    resumed, seen_after = run(tmp_path / "b")
    assert seen_after == [[0.6]] * 6  # steps 3..8 from the checkpoint at step 2, alphas restored
    for name, param in straight.params.items():
        assert torch.equal(param, resumed.params[name]), name

    plain = objective([0.1], loss="spo")
    batch = PairsWithFrozenLogprobs(dataset, chain).batch([0, 1, 2])
    model = lora_model(tokenizer)
    perturb_lora(model)
    before = plain.loss(model, batch).loss.item()
    plain.set_alphas([0.6])
    assert plain.loss(model, batch).loss.item() != before
    with pytest.raises(ValueError, match=r"alphas\[0\]: expected a value in \[0, 1\]"):
        plain.set_alphas([1.2])
    with pytest.raises(ValueError, match="needs 1 alphas, got 2"):
        plain.set_alphas([0.1, 0.2])
    assert plain.alphas == [0.6]
    with pytest.raises(ValueError, match="only the spo loss has alphas"):
        objective(loss="dpo").set_alphas([])


def test_empty_training_data_is_refused(tokenizer, dataset):
    empty = PreferenceDataset([], tokenizer, max_length=32, max_prompt_length=16)
    with pytest.raises(ValueError, match="train: the training data set is empty"):
        make_trainer(lora_model(tokenizer), empty, random_chain(1, 0), objective())
