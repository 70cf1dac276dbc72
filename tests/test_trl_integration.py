"""pyalign.integrations.trl.DPOTrainer against TRL's own DPOTrainer on a tiny Llama.

Same batch, same weights: every TRL loss type gives TRL's loss, metrics and gradients (full
fine-tuning with a reference model, LoRA, precomputed reference log-probs, and the logits route);
pyalign's losses on the shared types give TRL's numbers; kto_pair and spo are pyalign's losses on
the same log-probs; gradient accumulation and a short training run match TRL's.
"""

from __future__ import annotations

import weakref

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'pyalign[trl]')")
peft = pytest.importorskip("peft", reason="peft is not installed")

from datasets import Dataset  # noqa: E402
from helpers_tiny_lm import make_model, make_pairs, make_tokenizer, one_thread  # noqa: E402

from pyalign import losses  # noqa: E402
from pyalign.models import fused_head as hf  # noqa: E402
from pyalign.integrations import trl as pyalign_trl  # noqa: E402
from pyalign.integrations.trl import fused_head  # noqa: E402

DPOTrainer = pyalign_trl.DPOTrainer

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(autouse=True)
def _quiet_datasets():
    import datasets  # noqa: PLC0415

    datasets.disable_progress_bars()
    yield


TOKENIZER = make_tokenizer()


def conversational_pairs(n: int, seed: int = 0) -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in make_pairs(n, seed)]
    return Dataset.from_list(rows)


DATA = conversational_pairs(8)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2,
                    max_steps=2, report_to=[], logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                    label_smoothing=0.1, seed=0, disable_tqdm=True)
    settings.update(overrides)
    return trl.DPOConfig(**settings)


def lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)


def build(cls, tmp_path, setup: str, data=DATA, **kwargs):
    """A trainer of class ``cls`` for one setup; both classes get identical weights."""
    overrides = kwargs.pop("config", {})
    if setup == "full":  # full fine-tuning, separate reference model, untied lm_head
        policy, ref = make_model(len(TOKENIZER), seed=0), make_model(len(TOKENIZER), seed=1)
        return cls(model=policy, ref_model=ref, args=config(tmp_path, **overrides), train_dataset=data,
                   processing_class=TOKENIZER, **kwargs)
    model = make_model(len(TOKENIZER), seed=0, tied=True)
    if setup == "lora_precomputed":
        overrides["precompute_ref_log_probs"] = True
        # TRL caches precomputed log-probs by (dataset fingerprint, model hash): a fingerprint of
        # its own makes each trainer compute them rather than reuse the other's.
        data = data.map(lambda row: row, new_fingerprint=f"{cls.__module__}-{tmp_path.name}")
    trainer = cls(model=model, args=config(tmp_path, **overrides), train_dataset=data, processing_class=TOKENIZER,
                  peft_config=lora(), **kwargs)
    return trainer


def perturb_adapters(trainer, seed=0):
    """LoRA starts at B = 0 (policy == reference): move B so that rewards are not all zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))


def first_batch(trainer, size=4):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(size)])
    return trainer._prepare_inputs(batch)


def loss_grads_metrics(trainer, batch, loss_types, loss_weights=None):
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = list(loss_weights or [1.0] * len(loss_types))
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_close_to_scale(actual, expected, rel=2e-5, msg=""):
    """max |actual - expected| within ``rel`` of max |expected|: float32 sums in another order
    differ by a few ulps of the tensor's scale, not of each (possibly tiny) element."""
    error = (actual - expected).abs().max().item()
    assert error <= rel * expected.abs().max().item() + 1e-8, f"{msg}: max error {error:.3g}"


def assert_same(ours, theirs, rtol=1e-4, atol=1e-6):
    loss_a, grads_a, metrics_a = ours
    loss_b, grads_b, metrics_b = theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_b:
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=rtol, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_b
    for name in grads_b:
        assert_close_to_scale(grads_a[name], grads_b[name], msg=name)


@pytest.mark.parametrize("setup", ["full", "lora", "lora_precomputed"])
def test_every_trl_loss_type_gives_trls_loss_metrics_and_gradients(tmp_path, setup):
    theirs = build(trl.DPOTrainer, tmp_path / "trl", setup)
    ours = build(DPOTrainer, tmp_path / "ours", setup)
    if setup != "full":
        perturb_adapters(theirs)
        perturb_adapters(ours)
    batch = first_batch(theirs)
    if setup == "lora_precomputed":
        assert ours.pyalign_routes, "the reference log-probs were not precomputed by pyalign"
        assert theirs.train_dataset._fingerprint != ours.train_dataset._fingerprint
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(first_batch(ours)[column], batch[column], rtol=1e-5, atol=1e-5)
    nonzero = 0
    for loss_type in pyalign_trl.TRL_LOSS_TYPES:
        result = loss_grads_metrics(ours, batch, [loss_type])
        assert_same(result, loss_grads_metrics(theirs, batch, [loss_type]))
        nonzero += abs(result[2]["rewards/margins"]) > 1e-4
    assert nonzero, "rewards are all zero: the comparison would not see the reference"
    # A mixture through loss_weights (MPO-style).
    mixture = (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    assert_same(loss_grads_metrics(ours, batch, *mixture), loss_grads_metrics(theirs, batch, *mixture))
    routes = {route for _, route, _ in ours.pyalign_routes}
    assert routes == {"fused lm_head"}, ours.pyalign_routes


def test_logits_route_gives_trls_numbers(tmp_path, caplog):
    """fused=False (and models pyalign.models.fused_head does not fuse): the fused op on the logits."""
    theirs = build(trl.DPOTrainer, tmp_path / "trl", "full")
    ours = build(DPOTrainer, tmp_path / "ours", "full", fused=False)
    batch = first_batch(theirs)
    for loss_type in ("sigmoid", "ipo", "apo_down"):
        assert_same(loss_grads_metrics(ours, batch, [loss_type]), loss_grads_metrics(theirs, batch, [loss_type]))
    assert {route for _, route, _ in ours.pyalign_routes} == {"logits"}


def test_use_weighting_through_pyalign(tmp_path):
    """WPO weights need log_sum_sq_probs: pyalign's chunk loop computes it."""
    theirs = build(trl.DPOTrainer, tmp_path / "trl", "full", config={"use_weighting": True})
    ours = build(DPOTrainer, tmp_path / "ours", "full", config={"use_weighting": True})
    batch = first_batch(theirs)
    assert_same(loss_grads_metrics(ours, batch, ["sigmoid"]), loss_grads_metrics(theirs, batch, ["sigmoid"]))
    assert {route for _, route, _ in ours.pyalign_routes} == {"fused lm_head"}


def sequence_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return hf.causal_lm_sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], labels)


def test_pyalign_losses_on_the_shared_types_give_trls_values(tmp_path):
    """SHARED_LOSS_TYPES: TRL's loss types that pyalign implements, with TRL's conventions."""
    trainer = build(trl.DPOTrainer, tmp_path, "full")
    batch = first_batch(trainer)
    with torch.no_grad():
        policy, ref = sequence_logps(trainer.model, batch), sequence_logps(trainer.ref_model, batch)
    counts = (batch["completion_mask"][:, 1:] != 0).sum(1).float()
    for trl_type, name in pyalign_trl.SHARED_LOSS_TYPES.items():
        trl_loss = loss_grads_metrics(trainer, batch, [trl_type])[0]
        options = {"label_smoothing": trainer.label_smoothing} if name == "robust" else {}
        # TRL's "sigmoid" ignores label_smoothing (pyalign's dpo would apply it); IPO's log-ratios
        # are per completion token.
        p, r = (policy / counts, ref / counts) if name == "ipo" else (policy, ref)
        ours = losses.get_loss(name)(*p.chunk(2), *r.chunk(2), beta=trainer.beta, **options)
        torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-6, msg=trl_type)
    smoothed = losses.dpo(*policy.chunk(2), *ref.chunk(2), beta=trainer.beta, label_smoothing=0.1).loss
    assert not torch.allclose(smoothed, loss_grads_metrics(trainer, batch, ["sigmoid"])[0])


def test_kto_pair_and_spo_are_pyalign_losses_on_trls_log_probs(tmp_path):
    frozen = make_model(len(TOKENIZER), seed=2)
    ours = build(DPOTrainer, tmp_path, "full", config={"loss_type": ["sigmoid", "kto_pair", "spo"],
                                                       "loss_weights": [0.5, 0.25, 1.0]},
                 spo_alphas=[0.3], spo_chain_models=[frozen])
    assert set(pyalign_trl.SPO_CHAIN_COLUMNS) <= set(ours.train_dataset.column_names)
    batch = first_batch(ours)
    loss, grads, metrics = loss_grads_metrics(ours, batch, ours.args.loss_type, ours.args.loss_weights)

    model = ours.model
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref, chain0 = sequence_logps(ours.ref_model, batch), sequence_logps(frozen, batch)
    policy = sequence_logps(model, batch)
    torch.testing.assert_close(batch["spo_chain_chosen_logps"][:, 0], chain0.chunk(2)[0], rtol=1e-5, atol=1e-5)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    expected = (0.5 * losses.dpo(pc, pr, rc, rr, beta=0.1).loss
                + 0.25 * losses.kto_pair(pc, pr, rc, rr, beta=0.1).loss
                + losses.spo(pc, pr, torch.stack([chain0.chunk(2)[0], rc]), torch.stack([chain0.chunk(2)[1], rr]),
                             alphas=[0.3], beta=0.1).loss)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        assert_close_to_scale(grads[name], param.grad, msg=name)
    assert {"kto_pair/kl", "spo/rewards/margins", "rewards/margins", "entropy"} <= metrics.keys()

    # The same chain given as precomputed columns (spo_chain_models not needed).
    again = build(DPOTrainer, tmp_path / "again", "full", data=ours.train_dataset,
                  config={"loss_type": ["spo"]}, spo_alphas=[0.3])
    torch.testing.assert_close(first_batch(again)["spo_chain_rejected_logps"], batch["spo_chain_rejected_logps"])

    # Round 1 (no earlier dimension): SPO is sigmoid DPO against the reference.
    round_one = build(DPOTrainer, tmp_path / "round1", "full", config={"loss_type": ["spo"]}, spo_alphas=[])
    batch = first_batch(round_one)
    spo_loss = loss_grads_metrics(round_one, batch, ["spo"])[0]
    torch.testing.assert_close(spo_loss, loss_grads_metrics(round_one, batch, ["sigmoid"])[0])


def train(trainer):
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


def test_gradient_accumulation_and_training_match_trl(tmp_path):
    """Two optimizer steps of 2 pairs as 2 micro-batches of 1 (LoRA, gradient checkpointing): the
    same logged losses, metrics and final adapters as TRL's, and as one micro-batch of 2."""
    settings = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
                "gradient_checkpointing": True}
    runs = {}
    for label, cls, extra in (("trl", trl.DPOTrainer, {}), ("ours", DPOTrainer, {}),
                              ("ours_no_accum", DPOTrainer, {"per_device_train_batch_size": 2,
                                                             "gradient_accumulation_steps": 1})):
        trainer = build(cls, tmp_path / label, "lora", config={**settings, **extra})
        perturb_adapters(trainer)
        logs = train(trainer)
        adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[label] = (logs, adapters)
    (trl_logs, trl_weights), (our_logs, our_weights), (_, single_weights) = runs.values()
    assert len(our_logs) == len(trl_logs) == 2
    for ours, theirs in zip(our_logs, trl_logs):
        assert ours.keys() == theirs.keys()
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for name in trl_weights:
        assert_close_to_scale(our_weights[name], trl_weights[name], msg=name)
        assert_close_to_scale(our_weights[name], single_weights[name], rel=1e-4, msg=name)
    assert any((our_weights[n] - trl_weights[n]).abs().max() < 1e-6 for n in trl_weights)


ALL_OUTPUTS = ("log_probs", *fused_head.STAT_FIELDS)


def twin_heads(temperature: float, make=lambda: make_model(len(TOKENIZER))):
    """The same model twice, one with TRL's own fused forward, one with pyalign's."""
    theirs, ours = make(), make()
    trl.trainer.utils.add_fused_lm_head(theirs, temperature=temperature, outputs=ALL_OUTPUTS)
    settings = fused_head.HeadSettings()
    fused_head.add_fused_lm_head(ours, temperature=temperature, outputs=ALL_OUTPUTS,
                                 trl_add_fused_lm_head=trl.trainer.utils.add_fused_lm_head, settings=settings)
    return theirs, ours, settings


def assert_same_fused_outputs(got, expected):
    assert torch.equal(got.label_mask, expected.label_mask)
    for name in ("loss", *ALL_OUTPUTS):
        a, b = getattr(got, name), getattr(expected, name)
        if b.dtype == torch.bool:
            # a tie between the two top logits may round either way; the rest must agree
            assert (a != b).float().mean() <= 0.05, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_and_pre_shifted_labels_are_answered(temperature):
    """TRL's temperature is a logit scale, and pre-shifted ``shift_labels`` (context parallelism) are
    labels aligned with the hidden states: pyalign answers both, with TRL's numbers."""
    theirs, ours, settings = twin_heads(temperature)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(TOKENIZER), (2, 9), generator=gen)
    labels = input_ids.masked_fill(torch.arange(9) < 3, -100)
    for kwargs in (dict(labels=labels), dict(shift_labels=hf.shift_labels(labels))):
        with torch.no_grad():
            got = ours(input_ids=input_ids, fused_lm_head=True, **kwargs)
            expected = theirs(input_ids=input_ids, fused_lm_head=True, **kwargs)
        assert settings.routes[-1][1] == "fused lm_head", settings.routes[-1]
        assert got.log_probs.shape == expected.log_probs.shape == (2, 9 if "shift_labels" in kwargs else 8)
        assert_same_fused_outputs(got, expected)


def test_temperature_on_a_soft_capped_model():
    """Gemma 2 under a temperature: TRL's softcap(logits) / T is the op's (c/T) tanh((x/T) / (c/T))."""
    from transformers import Gemma2Config, Gemma2ForCausalLM  # noqa: PLC0415

    def make():
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0))
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        return model

    theirs, ours, settings = twin_heads(0.7, make)
    input_ids = torch.randint(3, len(TOKENIZER), (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
        expected = theirs(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    if hf.op_takes_transform():
        assert settings.routes[-1][1] == "fused lm_head", settings.routes[-1]
    assert_same_fused_outputs(got, expected)


def test_hand_back_to_trl_and_strict(tmp_path):
    """What pyalign does not compute goes to TRL's own forward, or raises with strict=True: here
    router logits of a model with no load-balancing loss of its own (the MoE case is answered,
    test_moe_auxiliary_loss_matches_trl; FSDP1 and tensor parallelism: test_sharded_heads_are_handed_back)."""
    model = make_model(len(TOKENIZER))
    assert fused_head.handback_reason(fused_head.HeadSettings(), model, temperature=0.7, outputs=("log_probs",),
                                      shift_labels=torch.zeros(1, 3), model_kwargs={"output_router_logits": True}) == ""
    strict = build(DPOTrainer, tmp_path / "strict", "full", strict=True)
    batch = first_batch(strict)
    with pytest.raises(ValueError, match="strict: .*router logits were requested .*load_balancing_loss_func"):
        strict.model(input_ids=batch["input_ids"], labels=batch["input_ids"], output_router_logits=True,
                     fused_lm_head=True)


def test_logits_token_stats_match_the_reference():
    from pyalign.reference import reference_token_stats  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 50, generator=gen)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[0, :3] = -100
    labels[1, 2] = logits[1, 2].argmax()
    stats = fused_head.logits_token_stats(logits, labels, chunk_bytes=8 * 50 * 4)
    expected = reference_token_stats(logits, labels)
    for name in fused_head.STAT_FIELDS:
        torch.testing.assert_close(stats[name], expected[name].to(stats[name].dtype), msg=name)
    assert stats["is_top1"][1, 2]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="args.loss_type: unknown loss type 'dpo'"):
        build(DPOTrainer, tmp_path, "full", config={"loss_type": ["dpo"]})
    with pytest.raises(ValueError, match="spo_alphas: the spo loss needs"):
        build(DPOTrainer, tmp_path, "full", config={"loss_type": ["spo"]})
    with pytest.raises(ValueError, match=r"alphas\[0\]"):
        build(DPOTrainer, tmp_path, "full", config={"loss_type": ["spo"]}, spo_alphas=[1.5])
    with pytest.raises(ValueError, match="train_dataset: the spo loss needs the columns"):
        build(DPOTrainer, tmp_path, "full", config={"loss_type": ["spo"]}, spo_alphas=[0.1])
    with pytest.raises(ValueError, match="kto_kl: only used by the 'kto_pair'"):
        build(DPOTrainer, tmp_path, "full", kto_kl=0.1)
    with pytest.raises(ValueError, match="args.ld_alpha"):
        build(DPOTrainer, tmp_path, "full", config={"loss_type": ["kto_pair"], "ld_alpha": 0.5})
    with pytest.raises(ValueError, match="fused: expected one of"):
        build(DPOTrainer, tmp_path, "full", fused="yes")


def test_unsupported_trl_version_is_refused(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"supports trl>=1.16,<1.17, found trl 1.17.0"):
        pyalign_trl._check_trl()
    monkeypatch.setattr(trl, "__version__", "1.16.3.dev0")
    pyalign_trl._check_trl()


def test_trl_path_is_restored_after_construction(tmp_path):
    build(DPOTrainer, tmp_path / "ours", "full")
    assert trl.trainer.dpo_trainer.add_fused_lm_head is trl.trainer.utils.add_fused_lm_head
    theirs = build(trl.DPOTrainer, tmp_path / "trl", "full")
    assert not hasattr(theirs.model, "_pyalign_fused_head")


def test_moe_auxiliary_loss_matches_trl(tmp_path):
    """The router's load-balancing loss: pyalign computes the model's own recipe from the decoder's
    router logits (checked once against the model's aux_loss), so the policy forward stays fused
    and gives TRL's loss, gradients and aux_loss metric."""
    from transformers import MixtralConfig, MixtralForCausalLM  # noqa: PLC0415

    def mixtral(seed):
        config = MixtralConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, router_aux_loss_coef=0.1, pad_token_id=0, eos_token_id=2,
                               bos_token_id=None, max_position_embeddings=256)
        torch.manual_seed(seed)
        return MixtralForCausalLM(config)

    results = []
    for label, cls in (("trl", trl.DPOTrainer), ("ours", DPOTrainer)):
        trainer = cls(model=mixtral(0), ref_model=mixtral(1), args=config(tmp_path / label), train_dataset=DATA,
                      processing_class=TOKENIZER)
        assert trainer.aux_loss_enabled
        results.append(loss_grads_metrics(trainer, first_batch(trainer), ["sigmoid"]))
    assert_same(results[1], results[0])
    assert "aux_loss" in results[1][2]
    routes = {(route, reason) for _, route, reason in trainer.pyalign_routes}
    assert routes == {("fused lm_head", "")}


def test_sharded_heads_are_handed_back():
    class ShardedTrainer:
        is_fsdp_enabled = True

    trainer = ShardedTrainer()
    settings = fused_head.HeadSettings(trainer=weakref.ref(trainer))
    model = make_model(len(TOKENIZER))
    reason = fused_head.handback_reason(settings, model, temperature=1.0, outputs=("log_probs",),
                                        shift_labels=None, model_kwargs={})
    assert reason.startswith("FSDP shards the lm_head")


def test_bf16_autocast_and_the_fp32_head(tmp_path, monkeypatch):
    """DPOConfig(bf16=True) on the CPU: the lm_head computes in bf16 like TRL's, or in float32 where
    this CPU has no native bf16 matmul (there bf16 products are 8-450x slower than float32)."""
    theirs = build(trl.DPOTrainer, tmp_path / "trl", "full", config={"bf16": True})
    ours = build(DPOTrainer, tmp_path / "ours", "full", config={"bf16": True})
    batch = first_batch(theirs)
    # What Trainer.train runs the forward under (accelerate wraps the prepared model's forward).
    with theirs.accelerator.autocast():
        expected = loss_grads_metrics(theirs, batch, ["sigmoid"])
    with ours.accelerator.autocast():
        assert torch.is_autocast_enabled("cpu")
        got = loss_grads_metrics(ours, batch, ["sigmoid"])
    torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
    assert got[2]["logps/chosen"] == pytest.approx(expected[2]["logps/chosen"], rel=2e-2)

    head, _ = hf.fused_head_or_reason(ours.model)
    hidden = torch.randn(2, 5, head.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, w, _, reason = fused_head.head_operands(hidden, head, cast_lm_head_to_fp32=False)
        assert (h.dtype, w.dtype) == ((torch.float32,) * 2 if reason else (torch.bfloat16,) * 2)
        monkeypatch.setattr(fused_head, "cpu_half_matmul_is_slow", lambda dtype: True)
        h, w, _, reason = fused_head.head_operands(hidden, head, cast_lm_head_to_fp32=False)
    assert (h.dtype, w.dtype) == (torch.float32, torch.float32) and "no native" in reason
    assert torch.equal(h, hidden), "the float32 head must see the decoder's own hidden states, not a bf16 copy"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(fused_head, "cpu_half_matmul_is_slow", lambda dtype: False)
        h, w, _, reason = fused_head.head_operands(hidden, head, cast_lm_head_to_fp32=True)
    assert (h.dtype, w.dtype, reason) == (torch.float32, torch.float32, "")


def test_evaluate_matches_trl(tmp_path):
    results = []
    for label, cls in (("trl", trl.DPOTrainer), ("ours", DPOTrainer)):
        trainer = build(cls, tmp_path / label, "lora", config={"per_device_eval_batch_size": 4})
        perturb_adapters(trainer)
        results.append(trainer.evaluate(eval_dataset=conversational_pairs(4, seed=1)))
    theirs, ours = results
    assert ours.keys() == theirs.keys() and "eval_rewards/margins" in ours
    for key in theirs:
        if key.startswith("eval_") and not key.endswith(("_time", "_runtime", "_per_second")):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
