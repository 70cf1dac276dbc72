"""Extreme logits (issue 18 item 5): rows offset by 1e3 ... 1e30, and rows with one huge logit among
ordinary ones, through the fused ops on every backend and through the float64 reference itself,
against the exact answer computed here in float64 on the logits minus their row maximum.

Before the fix the backward recomputed the softmax from one float32 log-sum-exp: gradient errors
of ~2e-5 at an offset of 1e3, 2e-3 at 1e5, 0.2 at 1e7; with a row maximum >= 1e16 the forward
returned 0 instead of -log V and gradient rows summed to V - 1 (the float64 reference alike, a
little further out). Each row is now normalised by its maximum and the log of the sum of
exp(z - max), kept apart (pyalign/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

import pyalign
from pyalign.reference import reference_forward, reference_token_logprobs, reference_token_stats
from tests.backends_under_test import DEVICE, GRAD_TOL, backends_for_device, is_interpreted

BACKENDS = backends_for_device()
OFFSETS = [0.0, 1e3, 1e5, 1e7, 1e16, 1e30, -1e30]
TRANSFORMS = [(1.0, None), (0.5, None), (1.0, 30.0)]
IDS = [f"scale{s}-cap{c}" for s, c in TRANSFORMS]


def extreme_rows(vocab, dtype, *, seed=0):
    """[len(OFFSETS) + 2, V]: one row per offset, then a row with one logit of 1e30 and a row with
    one logit of 1e7 among N(0, 3^2) logits. Labels: the huge logits' own positions on those rows."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(len(OFFSETS) + 2, vocab, generator=gen, dtype=torch.float64) * 3
    rows = base.clone()
    rows[: len(OFFSETS)] += torch.tensor(OFFSETS, dtype=torch.float64).unsqueeze(1)
    rows[-2, vocab // 2] = 1e30
    rows[-1, 3] = 1e7
    labels = torch.randint(0, vocab, (rows.shape[0],), generator=gen)
    labels[-2], labels[-1] = vocab // 2, 3
    upstream = torch.randn(rows.shape[0], generator=gen, dtype=torch.float64)
    return rows.to(dtype).to(DEVICE), labels.to(DEVICE), upstream.to(DEVICE)


def exact(logits, labels, upstream, logit_scale=1.0, softcap=None):
    """log p and d(sum upstream * log p)/d logits in float64, written out independently of the
    library: the transform, then the row maximum subtracted before anything else."""
    x = logits.detach().double().requires_grad_()
    if softcap is None:
        z = (x - x.detach().amax(-1, keepdim=True)) * logit_scale
    else:
        z = softcap * torch.tanh(x * (logit_scale / softcap))
        z = z - z.detach().amax(-1, keepdim=True)
    logp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logp * upstream).sum().backward()
    return logp.detach(), x.grad


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_at_any_offset(backend, dtype, transform):
    if dtype == torch.float64 and backend not in ("torch", "cpu"):
        pytest.skip(f"{backend} takes no float64")
    vocab = 600 if is_interpreted(backend) else 5000  # 5000: several of the CPU kernel's blocks
    logits, labels, upstream = extreme_rows(vocab, dtype)
    want_logp, want_grad = exact(logits, labels, upstream, *transform)
    leaf = logits.clone().requires_grad_()
    logp = pyalign.token_logprobs(leaf, labels, backend=backend, logit_scale=transform[0], softcap=transform[1])
    (logp.double() * upstream).sum().backward()
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double(), want_logp, atol=atol, rtol=1e-6)
    grad_atol, grad_rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(leaf.grad.double(), want_grad, atol=grad_atol, rtol=grad_rtol)
    assert torch.isfinite(logp).all() and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_rows_far_out_are_minus_log_v(backend):
    """A float32 row at 1e16 holds one value V times: log p = -log V (not 0) and the gradient is
    g * (onehot - 1/V), which sums to 0 over the row (not (1 - V) g)."""
    vocab = 1000
    logits = torch.full((2, vocab), 1e16, device=DEVICE)
    logits[1] = -3e38
    labels = torch.tensor([5, 999], device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp = pyalign.token_logprobs(leaf, labels, backend=backend)
    logp.sum().backward()
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(vocab)), atol=2e-6, rtol=0)
    torch.testing.assert_close(leaf.grad.sum(-1), torch.zeros(2, device=DEVICE), atol=1e-5, rtol=0)
    torch.testing.assert_close(leaf.grad[0, 0], torch.tensor(-1 / vocab, device=DEVICE))


def test_reference_at_any_offset():
    """The float64 reference (what every backend is tested against) is exact far out too."""
    for dtype in (torch.float32, torch.float64):
        logits, labels, upstream = extreme_rows(300, dtype, seed=2)
        for logit_scale, softcap in TRANSFORMS:
            want_logp, want_grad = exact(logits, labels, upstream, logit_scale, softcap)
            leaf = logits.clone().requires_grad_()
            logp = reference_token_logprobs(leaf, labels, logit_scale=logit_scale, softcap=softcap)
            (logp.double() * upstream).sum().backward()
            torch.testing.assert_close(logp.double(), want_logp, atol=1e-6 if dtype == torch.float32 else 1e-12,
                                       rtol=1e-7)
            torch.testing.assert_close(leaf.grad.double(), want_grad, atol=1e-7, rtol=1e-6)
            forward_logp, _ = reference_forward(logits.unsqueeze(0), labels.unsqueeze(0), -100, logit_scale, softcap)
            torch.testing.assert_close(forward_logp[0], logp.detach())
    uniform = torch.full((1, 1000), 1e16, dtype=torch.float64)
    assert reference_token_logprobs(uniform, torch.tensor([3])).item() == pytest.approx(-math.log(1000), abs=1e-12)
    stats = reference_token_stats(uniform, torch.tensor([3]))
    assert stats["entropy"].item() == pytest.approx(math.log(1000), abs=1e-12)


def integer_linear_case(offset, dtype, *, seed=0, vocab=41, width=8):
    """hidden and weight of small integers and a bias of ``offset`` plus integers: every logit is
    an exact integer in float32 up to 2^24 (above, the bias alone rounds, identically everywhere),
    so the fused op and the materialised logits see the very same numbers."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (2, 9, width), generator=gen).to(dtype)
    weight = torch.randint(-3, 4, (vocab, width), generator=gen).to(dtype)
    bias = (offset + torch.randint(-20, 20, (vocab,), generator=gen).double()).to(dtype)
    labels = torch.randint(0, vocab, (2, 9), generator=gen)
    labels[0, :3] = -100
    upstream = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE) for t in (hidden, weight, bias, labels, upstream)]


@pytest.mark.parametrize("mode", ["default", "low_memory"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_at_large_offsets(backend, mode):
    """The fused lm_head (forward, its frozen-weight precompute, the vocabulary-major backward with
    its column-0 rewrite, the statistics) at offsets 1e5, 1e7, 1e16 against the exact answer."""
    for offset in (1e5, 1e7, 1e16):
        hidden, weight, bias, labels, upstream = integer_linear_case(offset, torch.float32)
        logits = hidden @ weight.T + bias
        keep = labels != -100
        safe = torch.where(keep, labels, 0)
        want_logp, want_dlogits = exact(logits, safe, upstream * keep)
        want_logp = torch.where(keep, want_logp, 0.0)
        for requires in [(True, True, True), (True, False, False)]:
            leaves = [t.clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]
            logp, stats = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], mode=mode,
                                                        chunk_size=5, backend=backend, return_stats=True)
            (logp.double() * upstream).sum().backward()
            torch.testing.assert_close(logp.double(), want_logp, atol=2e-5, rtol=1e-6, msg=f"offset {offset}")
            # The exact gradients of hidden, weight and bias from the exact d_logits.
            want = {"hidden": want_dlogits @ weight.double(), "weight": want_dlogits.reshape(-1, bias.numel()).T
                    @ hidden.double().reshape(-1, hidden.shape[-1]), "bias": want_dlogits.sum((0, 1))}
            for name, leaf in zip(("hidden", "weight", "bias"), leaves):
                if leaf.requires_grad:
                    torch.testing.assert_close(leaf.grad.double(), want[name], atol=1e-4, rtol=1e-5,
                                               msg=lambda m, n=name: f"offset {offset}, {n}: {m}")
            ref_stats = reference_token_stats(logits, labels)
            torch.testing.assert_close(stats["entropy"].double(), ref_stats["entropy"].double(), atol=2e-5,
                                       rtol=1e-5)
