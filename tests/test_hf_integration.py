"""The transformers integration: a tiny random Llama (tied and untied embeddings, with and without
peft LoRA; LoRA, modules_to_save and trainable tokens on the lm_head) through the fused lm_head
against the model's own logits — values and gradients —, soft-capped logits, forwards that do
something else (refused with the reason), the check's cache, and a LoRA training step both ways.
Every causal-LM family of the installed transformers: tests/test_model_families.py. The peak
memory comparison needs CUDA."""

import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from pyalign.models import fused_head as hf  # noqa: E402

VOCAB = 100
LOGGER = "pyalign.models.fused_head"


def tiny_llama(tie: bool, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper predictions than the random init, so log-probs vary
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def with_lora(model, seed: int = 1, **kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "up_proj"])
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kwargs)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def make_batch(pairs=2, time=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2 * pairs, time), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100       # the prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def sequence_logps_and_grads(model, batch, fused, **kwargs):
    model.zero_grad(set_to_none=True)
    logps = hf.causal_lm_sequence_logprobs(model, *batch, fused=fused, **kwargs)
    (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
    return logps.detach(), grads_of(model)


def assert_same_grads(grads, expected, atol=1e-5, rtol=1e-4):
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("tie, average", [(True, False), (False, False), (True, True)])
def test_fused_equals_logits_path(tie, average):
    model = tiny_llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    batch = make_batch()
    fused = sequence_logps_and_grads(model, batch, True, average=average)
    eager = sequence_logps_and_grads(model, batch, False, average=average)
    torch.testing.assert_close(fused[0], eager[0], atol=1e-5, rtol=1e-5)
    assert "lm_head.weight" in fused[1] or tie
    assert_same_grads(fused[1], eager[1])


@pytest.mark.parametrize("tie, mode", [(True, "default"), (False, "default"), (True, "low_memory")])
def test_lora_fused_equals_logits_path(tie, mode):
    model = with_lora(tiny_llama(tie))
    head, reason = hf.fused_head_or_reason(model)
    assert head is not None, reason
    batch = make_batch(seed=1)
    fused = sequence_logps_and_grads(model, batch, True, mode=mode)
    eager = sequence_logps_and_grads(model, batch, False)
    torch.testing.assert_close(fused[0], eager[0], atol=1e-5, rtol=1e-5)
    assert fused[1] and all("lora_" in name for name in fused[1])
    assert_same_grads(fused[1], eager[1])


@pytest.mark.parametrize("wrap", [
    dict(target_modules=["q_proj", "lm_head"]),
    dict(target_modules=["q_proj", "lm_head"], lora_bias=True),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
])
def test_adapted_lm_head_is_fused_exactly(wrap):
    """LoRA on the lm_head (the effective weight W + scaling B A, gradients reaching A and B through
    autograd) and peft's modules_to_save (the copy in use): fused, equal to peft's own forward."""
    model = with_lora(tiny_llama(False), **wrap)
    head, reason = hf.fused_head_or_reason(model)
    assert head is not None, reason
    batch = make_batch(seed=2)
    fused = sequence_logps_and_grads(model, batch, True)
    eager = sequence_logps_and_grads(model, batch, False)
    torch.testing.assert_close(fused[0], eager[0], atol=1e-5, rtol=1e-5)
    assert any("lm_head" in name for name in fused[1])
    assert_same_grads(fused[1], eager[1])
    with model.disable_adapter():  # the base head again: checked for this state too
        assert hf.fused_head_or_reason(model)[0] is not None
        torch.testing.assert_close(hf.causal_lm_sequence_logprobs(model, *batch, fused=True),
                                   hf.causal_lm_sequence_logprobs(model, *batch, fused=False), atol=1e-5, rtol=1e-5)


def test_lora_dropout_on_the_lm_head_is_refused_in_training(caplog):
    model = with_lora(tiny_llama(False), target_modules=["lm_head"])
    model.base_model.model.lm_head.lora_dropout["default"] = torch.nn.Dropout(0.5)
    model.train()
    head, reason = hf.fused_head_or_reason(model)
    assert head is None and "lora_dropout=0.5" in reason
    batch = make_batch(seed=2)
    hf._warned.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        hf.causal_lm_sequence_logprobs(model, *batch)
    assert any("instead of the fused lm_head" in r.getMessage() and "lora_dropout" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="fused: the fused lm_head path cannot run this model: lm_head is LoRA"):
        hf.causal_lm_sequence_logprobs(model, *batch, fused=True)
    model.eval()  # no dropout: linear in the effective weight again
    assert hf.fused_head_or_reason(model)[0] is not None


@pytest.mark.parametrize("tie", [True, False])
def test_trainable_token_indices(tie):
    """peft's trainable_token_indices wraps the lm_head too when it is tied: its merged weight is
    fused; untied, only the input embeddings change."""
    model = with_lora(tiny_llama(tie), trainable_token_indices=[3, 5])
    head, reason = hf.fused_head_or_reason(model)
    assert head is not None, reason
    assert (type(head.module).__name__ == "TrainableTokensWrapper") == tie
    batch = make_batch(seed=3)
    auto = sequence_logps_and_grads(model, batch, "auto")
    eager = sequence_logps_and_grads(model, batch, False)
    torch.testing.assert_close(auto[0], eager[0], atol=1e-5, rtol=1e-5)
    assert any("trainable_tokens" in name for name in auto[1])
    assert_same_grads(auto[1], eager[1])


def test_soft_capped_logits_fused_or_refused_never_wrong():
    """Gemma 2 soft-caps its logits: fused with the cap where the op takes one, else refused."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits past the cap, so that the cap matters
    head, reason = hf.fused_head_or_reason(model)
    if hf.op_takes_transform():
        assert head is not None and head.transform == hf.HeadTransform(softcap=5.0), reason
    else:
        assert head is None and "soft-cap 5 of lm_head(h)" in reason and "takes no logit_scale" in reason
    batch = make_batch(seed=4)
    auto = sequence_logps_and_grads(model, batch, "auto")
    eager = sequence_logps_and_grads(model, batch, False)
    torch.testing.assert_close(auto[0], eager[0], atol=1e-5, rtol=1e-5)
    assert_same_grads(auto[1], eager[1])


def test_a_config_field_the_forward_ignores_changes_nothing():
    """The check reads what the forward does: Llama ignores a logit_scale set on its config."""
    llama = tiny_llama(False)
    llama.config.logit_scale = 0.5
    head, reason = hf.fused_head_or_reason(llama)
    assert head is not None and head.transform.identity, reason


class DecoderThenHead(transformers.LlamaForCausalLM):
    """A Llama whose own forward does ``change`` between its decoder and its returned logits."""

    change = "none"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if self.change == "hidden":
            hidden = hidden * 0.5
        logits = self.lm_head(hidden)
        if self.change == "twice":
            logits = logits + self.lm_head(hidden)
        elif self.change == "add":
            logits = logits + 1.0
        elif self.change == "slice":
            logits = logits[..., : VOCAB - 4]
        elif self.change == "mask":
            logits = logits.masked_fill(torch.arange(logits.shape[-1]) >= VOCAB - 4, -1e4)
        return CausalLMOutputWithPast(logits=logits)


@pytest.mark.parametrize("change, why", [
    ("none", ""),
    ("hidden", "is not its decoder's last_hidden_state"),
    ("twice", "called its lm_head 2 times"),
    ("add", "computes something else after the lm_head"),
    ("slice", "sliced or reshaped after the lm_head"),
    ("mask", "computes something else after the lm_head"),
])
def test_a_forward_that_does_something_else_is_refused(change, why):
    """Never wrong: what a forward does after the decoder that is not a scale or a soft-cap of
    lm_head(last hidden state) is refused with the reason, and "auto" gives the logits' numbers."""
    import pyalign

    torch.manual_seed(0)
    model = DecoderThenHead(tiny_llama(False).config)
    model.change = change
    head, reason = hf.fused_head_or_reason(model)
    input_ids, attention_mask, labels = make_batch(seed=4)
    labels = torch.where(labels >= 0, labels % (VOCAB - 4), labels)  # within the sliced vocabulary too
    batch = (input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if why:
        assert head is None and why in reason, reason
    else:
        assert head is not None, reason
    torch.testing.assert_close(hf.causal_lm_sequence_logprobs(model, *batch),
                               pyalign.sequence_logprobs(logits[:, :-1], batch[2][:, 1:]), atol=1e-5, rtol=1e-5)


def test_the_check_runs_once_per_model_state():
    model = tiny_llama(False)
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: None)
    head, reason = hf.fused_head_or_reason(model)
    assert head is None and "forward hooks" in reason  # refused before any check runs
    handle.remove()
    calls = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    for _ in range(3):
        assert hf.fused_head_or_reason(model)[0] is not None
    assert len(calls) == 2  # the model's forward (with the probe) and the decoder alone, once
    model.eval()
    assert hf.fused_head_or_reason(model)[0] is not None
    assert calls == [True, True, False, False]  # a new state (eval): checked again


def test_causal_lm_token_logprobs_matches_the_logits():
    import pyalign

    model = tiny_llama(True)
    batch = make_batch(seed=8)
    logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
    expected = pyalign.token_logprobs(logits[:, :-1], batch[2][:, 1:])
    for fused in (True, False):
        got = hf.causal_lm_token_logprobs(model, *batch, fused=fused)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss, kwargs", [("dpo", {}), ("ipo", {}), ("kto_pair", {}),
                                          ("apo_zero", {"nll_weight": 0.3})])
def test_lora_preference_loss_fused_equals_logits_path(loss, kwargs):
    model = with_lora(tiny_llama(True))
    batch = make_batch(pairs=3, seed=5)
    ref = torch.linspace(-40, -20, 6)
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        out = hf.causal_lm_preference_loss(model, *batch, loss, ref_logps=ref, fused=fused,
                                           beta=0.5, memory_budget=2 * 8 * VOCAB * 4, **kwargs)
        out.loss.backward()
        results.append((out, grads_of(model)))
    (fused_out, fused_grads), (eager_out, eager_grads) = results
    torch.testing.assert_close(fused_out.loss, eager_out.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_out.chosen_rewards, eager_out.chosen_rewards, atol=1e-5, rtol=1e-5)
    assert_same_grads(fused_grads, eager_grads)


def lora_training_step(fused: bool, checkpointing: bool = False):
    model = with_lora(tiny_llama(True))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = make_batch(pairs=2, seed=6)
    with torch.no_grad(), model.disable_adapter():
        ref = hf.causal_lm_sequence_logprobs(model, *batch, fused=fused)
    out = hf.causal_lm_preference_loss(model, *batch, "dpo", ref_logps=ref, beta=0.1, fused=fused)
    out.loss.backward()
    optimizer.step()
    return out.loss.item(), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_training_step_fused_equals_logits_path(checkpointing):
    fused_loss, fused_params = lora_training_step(True, checkpointing)
    eager_loss, eager_params = lora_training_step(False, checkpointing)
    assert fused_loss == pytest.approx(eager_loss, abs=1e-6)
    assert fused_params.keys() == eager_params.keys()
    for name in fused_params:
        torch.testing.assert_close(fused_params[name], eager_params[name], atol=1e-6, rtol=1e-5, msg=name)


def test_autocast_matches_the_models_own_cast():
    """Under CPU bf16 autocast the fused path computes in bf16, like lm_head under autocast."""
    model = with_lora(tiny_llama(False))
    batch = make_batch(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = sequence_logps_and_grads(model, batch, True)
        eager = sequence_logps_and_grads(model, batch, False)
    torch.testing.assert_close(fused[0], eager[0], atol=0.3, rtol=2e-2)
    for name in fused[1]:
        scale = eager[1][name].abs().max().item()
        assert (fused[1][name] - eager[1][name]).abs().max().item() <= 0.05 * scale + 1e-6, name


def test_shift_labels_and_bad_fused():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert hf.shift_labels(labels).tolist() == [[2, 3, -100], [-100, 6, -100]]
    with pytest.raises(ValueError, match="fused: expected one of"):
        hf.causal_lm_sequence_logprobs(tiny_llama(False), *make_batch(), fused="yes")


def cpu_peak_bytes(fn):
    """Peak of live CPU allocations during ``fn()``, from the profiler's allocation events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        pytest.skip("this torch's profiler does not expose allocation events")
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_fused_step_memory_cpu():
    """The peak-memory claim where it can be measured without a GPU: a LoRA DPO step with a
    4000-token vocabulary allocates at least the logits' size less through the fused lm_head."""
    config = transformers.LlamaConfig(
        vocab_size=4000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = with_lora(transformers.LlamaForCausalLM(config))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 4000, (4, 64), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :16] = -100
    ref = torch.full((4,), -500.0)
    losses = {}

    def step(fused):
        model.zero_grad(set_to_none=True)
        out = hf.causal_lm_preference_loss(model, input_ids, attention_mask, labels, "dpo",
                                           ref_logps=ref, fused=fused, memory_budget=1 << 18)
        out.loss.backward()
        losses[fused] = out.loss.item()

    fused_peak = cpu_peak_bytes(lambda: step(True))
    eager_peak = cpu_peak_bytes(lambda: step(False))
    logits_bytes = input_ids.numel() * 4000 * 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert eager_peak - fused_peak >= 0.9 * logits_bytes, (fused_peak, eager_peak, logits_bytes)


@pytest.mark.gpu
def test_fused_step_memory_gpu():
    """A LoRA DPO step of a small Llama with a 128k vocabulary at 8 x 1024 tokens (bf16): peak
    memory through the fused lm_head is lower than through the logits by at least the logits'
    size (the logits path holds the logits, their gradient and the un-sliced gradient)."""
    pairs, time, vocab = 4, 1024, 128256
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=time,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = with_lora(transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16))
    gen = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(0, vocab, (2 * pairs, time), device="cuda", generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : time // 4] = -100
    ref = torch.full((2 * pairs,), -9000.0, device="cuda")

    def peak_extra(fused):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = hf.causal_lm_preference_loss(model, input_ids, attention_mask, labels, "dpo",
                                           ref_logps=ref, fused=fused)
        out.loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out.loss.item()

    peak_extra(True), peak_extra(False)  # warm-up
    fused_peak, fused_loss = peak_extra(True)
    eager_peak, eager_loss = peak_extra(False)
    logits_bytes = 2 * pairs * time * vocab * 2
    print(f"peak above the inputs: fused {fused_peak / 2**30:.2f} GiB, logits path "
          f"{eager_peak / 2**30:.2f} GiB, logits {logits_bytes / 2**30:.2f} GiB")
    assert fused_loss == pytest.approx(eager_loss, abs=2e-2)
    assert eager_peak - fused_peak >= 0.9 * logits_bytes
