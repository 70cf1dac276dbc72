"""PreferenceLoss(hidden=, weight=) and linear_preference_loss against PreferenceLoss on
materialised logits, for every loss, both modes, one and several pair groups; the path taken for
coupled losses; the precomputed gradients under a scaled upstream gradient; bad input."""

import pytest
import torch

import pyalign
from pyalign.losses import linear_preference_loss as lpl
from pyalign.losses.linear_preference_loss import is_pair_separable, linear_preference_loss
from tests.backends_under_test import DEVICE

LOSS_CASES = [
    ("dpo", {}), ("dpo", {"label_smoothing": 0.1}), ("ipo", {}), ("hinge", {}),
    ("robust", {"label_smoothing": 0.1}), ("apo_zero", {}), ("apo_down", {}),
    ("kto_pair", {}), ("kto_pair", {"kl": 0.3}), ("spo", {"alphas": [0.1, 0.2]}),
    ("dpo", {"nll_weight": 0.5}),
]
MODES = ["default", "low_memory"]


def make_batch(pairs=3, time=9, width=16, vocab=40, dtype=torch.float64, *, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, time, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.5
    bias_t = torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, (2 * pairs, time), generator=gen)
    labels[:, :3] = -100          # prompts
    labels[1, 5:] = -100          # a short response
    labels[-1] = -100             # a fully ignored rejected row
    ref = torch.randn(2 * pairs, generator=gen) * 3 - 20
    chain = torch.randn(3, 2 * pairs, generator=gen) * 3 - 20
    move = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return (move(hidden), move(weight), move(bias_t), labels.to(DEVICE), move(ref).double(),
            move(chain).double())


def losses_of(name, kwargs, batch, *, requires=(True, True, True), upstream=1.7, **fused_kwargs):
    """(fused LossOutput, grads) and (materialised LossOutput, grads) on the same inputs."""
    hidden, weight, bias, labels, ref, chain = batch
    module = pyalign.PreferenceLoss(name, beta=0.5, **kwargs)
    extra = dict(chain_logps=chain) if name == "spo" else dict(ref_logps=ref)
    results = []
    for fused in (True, False):
        leaves = [None if t is None else t.detach().clone().requires_grad_(r)
                  for t, r in zip((hidden, weight, bias), requires)]
        if fused:
            out = module(hidden=leaves[0], weight=leaves[1], bias=leaves[2], labels=labels,
                         **extra, **fused_kwargs)
        else:
            logits = leaves[0] @ leaves[1].T + (0 if leaves[2] is None else leaves[2])
            out = module(logits, labels, **extra)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out.loss * upstream, wanted)
        results.append((out, grads))
    return results


def assert_same(fused, eager, atol, rtol):
    (out, grads), (ref_out, ref_grads) = fused, eager
    torch.testing.assert_close(out.loss.double(), ref_out.loss.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.chosen_rewards, ref_out.chosen_rewards, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.rejected_rewards, ref_out.rejected_rewards, atol=atol, rtol=rtol)
    assert out.metrics.keys() == ref_out.metrics.keys()
    for key in out.metrics:
        assert out.metrics[key] == pytest.approx(ref_out.metrics[key], rel=1e-5, abs=1e-6), key
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, kwargs", LOSS_CASES, ids=[f"{n}-{k}" for n, k in LOSS_CASES])
def test_every_loss_matches_materialised_logits(name, kwargs, mode):
    batch = make_batch()
    one_pair = 2 * 6 * 40 * 8  # bytes of one pair's 2x6 kept tokens of float64 logits
    for budget in (None, one_pair):  # one group of every pair, then one group per pair
        fused, eager = losses_of(name, kwargs, batch, mode=mode, memory_budget=budget)
        assert_same(fused, eager, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name, kwargs", [("dpo", {}), ("ipo", {}), ("spo", {"alphas": [0.1, 0.2]})])
@pytest.mark.parametrize("mode", MODES)
def test_float32_and_frozen_parameters(name, kwargs, mode):
    batch = make_batch(dtype=torch.float32, seed=1)
    for requires in [(True, True, True), (True, False, False), (False, True, False)]:
        fused, eager = losses_of(name, kwargs, batch, requires=requires, mode=mode, memory_budget=2000)
        assert_same(fused, eager, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("weight_grad_dtype", [None, torch.bfloat16])
def test_bfloat16_close_to_materialised(weight_grad_dtype):
    batch = make_batch(pairs=2, time=16, vocab=64, dtype=torch.bfloat16, seed=2)
    fused, eager = losses_of("dpo", {}, batch, memory_budget=1 << 12, weight_grad_dtype=weight_grad_dtype)
    (out, grads), (ref_out, ref_grads) = fused, eager
    torch.testing.assert_close(out.loss.float(), ref_out.loss.float(), atol=2e-2, rtol=2e-2)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.bfloat16
        scale = ref_grad.abs().max().item()
        assert (grad.double() - ref_grad.double()).abs().max().item() <= 0.05 * scale


def test_paths_taken(monkeypatch):
    """Separable losses in default mode take the pair-group path; kto_pair without kl, low_memory
    and a pair too large for the budget go through the op; the results agree either way."""
    calls = []
    original = lpl._pair_group_loss
    monkeypatch.setattr(lpl, "_pair_group_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = make_batch(seed=3)
    losses_of("dpo", {}, batch)
    assert len(calls) == 1
    losses_of("dpo", {}, batch, mode="low_memory")
    losses_of("kto_pair", {}, batch)
    fused, eager = losses_of("dpo", {}, batch, memory_budget=40 * 8)  # less than one pair
    assert_same(fused, eager, atol=1e-10, rtol=1e-10)
    assert len(calls) == 1
    losses_of("kto_pair", {"kl": 0.2}, batch)
    assert len(calls) == 2
    assert not is_pair_separable(pyalign.PreferenceLoss("kto_pair"))
    assert is_pair_separable(pyalign.PreferenceLoss("kto_pair", kl=0.1))
    assert is_pair_separable(pyalign.PreferenceLoss("spo", alphas=[0.1]))
    assert not is_pair_separable(lambda *args: None)


def test_a_fully_ignored_pair():
    hidden, weight, bias, labels, ref, chain = make_batch(seed=7)
    labels[[0, 3]] = -100  # pair 0: chosen and rejected both unscored
    fused, eager = losses_of("dpo", {}, (hidden, weight, bias, labels, ref, chain), memory_budget=2 * 6 * 40 * 8)
    assert_same(fused, eager, atol=1e-10, rtol=1e-10)


def test_pair_groups():
    assert lpl._pair_groups([4, 4, 4, 4], 8) == ([[0, 1], [2, 3]], [])
    assert lpl._pair_groups([4, 5, 0, 3], 8) == ([[0], [1, 2, 3]], [])
    assert lpl._pair_groups([4, 9, 3], 8) == ([[0, 2]], [1])
    assert lpl._pair_groups([9], 8) == ([], [0])
    assert lpl._pair_groups([], 8) == ([], [])


def test_a_pair_over_the_budget_goes_alone(monkeypatch):
    """One long pair does not push the whole batch off the pair-group path: it goes through the
    op by itself, the others stay in groups, and loss, rewards and gradients are unchanged."""
    seen = []
    original = lpl._pair_group_loss
    monkeypatch.setattr(lpl, "_pair_group_loss",
                        lambda *a, **k: seen.append((k["groups"], k["alone"])) or original(*a, **k))
    hidden, weight, bias, labels, ref, chain = make_batch(pairs=4, time=12, seed=8)
    labels[:, 3:6] = -100
    labels[[1, 5], 3:] = torch.randint(0, 40, (2, 9))  # pair 1: 18 kept tokens, the others 12
    batch = (hidden, weight, bias, labels, ref, chain)
    for name, kwargs in (("dpo", {}), ("apo_zero", {}), ("spo", {"alphas": [0.1, 0.2]})):
        seen.clear()
        fused, eager = losses_of(name, kwargs, batch, memory_budget=14 * 40 * 8)  # 14 rows of float64 logits
        assert seen == [([[0], [2], [3]], [1])]
        assert_same(fused, eager, atol=1e-10, rtol=1e-10)


def test_no_float32_accumulator_for_a_trained_half_precision_weight(monkeypatch):
    """A trainable bf16 weight over several pair groups: by default through the op (its weight
    gradient vocabulary-major, no [V, H] float32 buffer); weight_grad_dtype=float32 keeps the pair
    groups and their float32 accumulator. Both match the materialised path."""
    seen = []
    original = lpl._pair_group_loss
    monkeypatch.setattr(lpl, "_pair_group_loss", lambda *a, **k: seen.append(1) or original(*a, **k))
    batch = make_batch(seed=9, dtype=torch.bfloat16)
    budget = 8 * 40 * 2  # 8 rows of bf16 logits: one pair per group
    for weight_grad_dtype, groups_used in ((None, 0), (torch.float32, 1), (torch.bfloat16, 1)):
        seen.clear()
        fused, eager = losses_of("dpo", {}, batch, memory_budget=budget, weight_grad_dtype=weight_grad_dtype)
        assert len(seen) == groups_used, weight_grad_dtype
        (out, grads), (ref_out, ref_grads) = fused, eager
        torch.testing.assert_close(out.loss.float(), ref_out.loss.float(), atol=2e-3, rtol=2e-3)
        for grad, ref_grad in zip(grads, ref_grads):
            scale = ref_grad.abs().max().float()
            assert (grad.float() - ref_grad.float()).abs().max() <= 0.02 * scale
    seen.clear()
    losses_of("dpo", {}, batch, memory_budget=budget, requires=(True, False, False))  # frozen: groups
    assert len(seen) == 1


def test_plain_callable_and_no_grad():
    hidden, weight, bias, labels, ref, _ = make_batch(seed=4)
    module = pyalign.PreferenceLoss("dpo", beta=0.5)

    def loss_fn(policy, ref_logps, chain_logps, num_tokens):
        return module.loss_from_sequence_logprobs(policy, ref_logps, chain_logps, num_tokens)

    leaf = hidden.detach().requires_grad_()
    out = linear_preference_loss(loss_fn, leaf, weight, labels, bias=bias, ref_logps=ref)
    out_sep = linear_preference_loss(loss_fn, hidden.detach().requires_grad_(), weight, labels,
                                     bias=bias, ref_logps=ref, pair_separable=True)
    expected = module(hidden @ weight.T + bias, labels, ref)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out_sep.loss, expected.loss)
    with torch.no_grad():
        out = module(hidden=leaf, weight=weight, bias=bias, labels=labels, ref_logps=ref)
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, expected.loss)


def test_backward_scales_and_composes():
    """The loss may be scaled and added to other terms; hidden gets both contributions."""
    hidden, weight, bias, labels, ref, _ = make_batch(seed=5)
    module = pyalign.PreferenceLoss("dpo", beta=0.5)
    leaf = hidden.detach().requires_grad_()
    out = module(hidden=leaf, weight=weight, bias=bias, labels=labels, ref_logps=ref)
    (-3 * out.loss + leaf.square().sum()).backward()
    eager_leaf = hidden.detach().requires_grad_()
    eager = module(eager_leaf @ weight.T + bias, labels, ref)
    (-3 * eager.loss + eager_leaf.square().sum()).backward()
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bad, message", [
    (dict(hidden=torch.zeros(6, 16, dtype=torch.float64)), "hidden: expected shape \\[2B, T, H\\]|labels"),
    (dict(hidden=torch.zeros(5, 9, 16, dtype=torch.float64), labels=torch.zeros(5, 9, dtype=torch.long)),
     "hidden: expected an even number of rows"),
    (dict(ref_logps=None), "ref_logps: the dpo loss needs reference log-probs"),
    (dict(ref_logps=torch.zeros(4, dtype=torch.float64)), "ref_logps: expected shape"),
    (dict(mode="fast"), "mode: expected one of"),
    (dict(weight=torch.zeros(40, 15, dtype=torch.float64)), "weight: expected \\[V, 16\\]"),
])
def test_bad_input_names_the_argument(bad, message):
    hidden, weight, bias, labels, ref, _ = make_batch(seed=6)
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, ref_logps=ref)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        pyalign.PreferenceLoss("dpo")(**args)
    with pytest.raises(ValueError, match="loss_fn: expected a PreferenceLoss or a callable"):
        linear_preference_loss(42, hidden, weight, labels, ref_logps=ref)


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [False, True])
def test_pair_group_memory_and_values_gpu(train_weight):
    """8 x 1024 tokens, V = 32000, H = 1024, bf16: the logits of one group of pairs (at most the
    512 MiB budget) are the only [*, V] buffer, and the loss and hidden gradient match the
    materialised path."""
    pairs, time, width, vocab = 4, 1024, 1024, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2 * pairs, time, width, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (2 * pairs, time), device="cuda", generator=gen)
    labels[:, : time // 4] = -100
    with torch.no_grad():  # a reference near the policy, so that the loss is not saturated
        ref = pyalign.sequence_logprobs(hidden @ weight.T, labels)
        ref = ref + torch.randn(2 * pairs, device="cuda", generator=gen) * 5
    module = pyalign.PreferenceLoss("dpo", beta=0.1)
    leaf = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(train_weight)
    module(hidden=leaf, weight=w, labels=labels, ref_logps=ref).loss.backward()  # warm-up
    leaf.grad = None
    w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = module(hidden=leaf, weight=w, labels=labels, ref_logps=ref)
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = leaf.numel() * 2 + (w.numel() * 2 if train_weight else 0)  # one group: no accumulator
    assert extra <= lpl.PAIR_GROUP_BUDGET + grads + 64 * (1 << 20), extra / (1 << 20)
    eager_leaf = hidden.detach().requires_grad_()
    eager = module(eager_leaf @ weight.T, labels, ref)
    eager.loss.backward()
    torch.testing.assert_close(out.loss.float(), eager.loss.float(), atol=1e-2, rtol=1e-2)
    scale = eager_leaf.grad.abs().max().item()
    assert (leaf.grad.float() - eager_leaf.grad.float()).abs().max().item() <= 0.05 * scale
