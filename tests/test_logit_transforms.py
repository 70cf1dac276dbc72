"""Logit transforms (issue 17): ``logit_scale`` (Cohere, Granite's ``1 / logits_scaling``) and
``softcap`` (Gemma 2/3's ``final_logit_softcapping``) inside the fused ops, on every backend,
against the float64 reference: token_logprobs (values and gradients w.r.t. the logits, odd
vocabularies, ignored labels, fully ignored rows, non-contiguous logits, in-place backward,
torch.compile), the fused lm_head (values, gradients w.r.t. hidden, weight and bias in both modes,
the statistics), the vocabulary-parallel op (two gloo processes), float64 gradcheck, and the
argument checks. The reference itself is checked against the transform written out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign.reference import reference_token_logprobs, reference_token_stats, transformed_logits
from tests.backends_under_test import DEVICE, GRAD_TOL, LOGP_TOL, backends_for_device, is_interpreted

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers_processes, in spawned processes too

from helpers_processes import run_gloo  # noqa: E402

BACKENDS = backends_for_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (logit_scale, softcap): Command-R's 0.0625, Granite's 1 / logits_scaling = 1 / 8 and a scale
# above 1, Gemma 2's cap of 30, and a tight cap with a scale (most logits on the flat of tanh).
TRANSFORMS = [(0.0625, None), (0.125, None), (4.0, None), (1.0, 30.0), (2.0, 3.0)]
IDS = [f"scale{s}-cap{c}" for s, c in TRANSFORMS]


def make_logits(shape, vocab, dtype, *, seed=0, scale=6.0, shifted=True):
    """Logits [..., T, V] as the shifted view ``logits[:, :-1]`` (rows at every offset), labels with
    ignored positions and a fully ignored first sequence."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(*shape[:-1], shape[-1] + 1, vocab, generator=gen) * scale).to(dtype).to(DEVICE)
    logits = full[..., :-1, :] if shifted else full[..., 1:, :].contiguous()
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.25] = -100
    labels[0] = -100
    return logits, labels.to(DEVICE)


def check_op(backend, logits, labels, logit_scale, softcap, *, inplace=False):
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_in = logits.detach().clone().requires_grad_()
    ref = reference_token_logprobs(ref_in, labels, logit_scale=logit_scale, softcap=softcap)
    (ref.double() * upstream.double()).sum().backward()

    leaf = logits.detach().clone().requires_grad_()
    source = leaf * 1 if inplace else leaf
    out = pyalign.token_logprobs(source, labels, backend=backend, inplace_backward=inplace,
                                 logit_scale=logit_scale, softcap=softcap)
    atol, rtol = LOGP_TOL[logits.dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)
    assert torch.all(out[labels == -100] == 0)
    (out.double() * upstream.double()).sum().backward()
    atol, rtol = GRAD_TOL[logits.dtype]
    torch.testing.assert_close(leaf.grad.double(), ref_in.grad.double(), atol=atol, rtol=rtol)
    assert torch.all(leaf.grad[labels == -100] == 0)


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_reference_is_the_transform_written_out(transform):
    """log_softmax of z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x), and its
    gradient through tanh, computed naively in float64: the reference's normalised form agrees."""
    logit_scale, softcap = transform
    x = (torch.randn(3, 4, 37, dtype=torch.float64) * 8).requires_grad_()
    labels = torch.randint(0, 37, (3, 4))
    labels[1, 2] = -100
    z = logit_scale * x if softcap is None else softcap * torch.tanh(logit_scale * x / softcap)
    naive = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    naive = torch.where(labels == -100, 0.0, naive)
    (naive_grad,) = torch.autograd.grad(naive.sum(), x)
    ours = reference_token_logprobs(x, labels, logit_scale=logit_scale, softcap=softcap)
    (ours_grad,) = torch.autograd.grad(ours.sum(), x)
    torch.testing.assert_close(ours, naive, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours_grad, naive_grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(transformed_logits(x, logit_scale, softcap), z, atol=1e-12, rtol=1e-12)
    stats = reference_token_stats(x.detach(), labels, logit_scale=logit_scale, softcap=softcap)
    p = torch.softmax(z.detach(), -1)
    keep = labels != -100
    torch.testing.assert_close(stats["entropy"][keep], -(p * p.log()).sum(-1)[keep])
    torch.testing.assert_close(stats["mean_logits"][keep], z.detach().mean(-1)[keep])


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_values_and_gradients(backend, dtype, transform):
    vocabs = [7, 1000] if is_interpreted(backend) else [7, 1000, 4099, 50257]
    for vocab in vocabs:
        logits, labels = make_logits((2, 5), vocab, dtype, seed=vocab)
        assert not logits.is_contiguous()
        check_op(backend, logits, labels, *transform)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_in_place_backward(backend):
    for transform in TRANSFORMS:
        if backend in ("torch", "cpu"):
            check_op(backend, *make_logits((2, 4), 33, torch.float64, seed=3), *transform)
        check_op(backend, *make_logits((2, 4), 1000, torch.float32, seed=4), *transform, inplace=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_gradcheck(backend, transform):
    logits, labels = make_logits((2, 3), 6, torch.float64, seed=5, scale=3.0, shifted=False)
    labels[0, 0] = 2  # one kept position in the otherwise ignored first sequence
    logits.requires_grad_()
    logit_scale, softcap = transform
    assert torch.autograd.gradcheck(
        lambda x: pyalign.token_logprobs(x, labels, backend=backend, logit_scale=logit_scale, softcap=softcap),
        (logits,))
    assert torch.autograd.gradcheck(
        lambda x: pyalign.sequence_logprobs(x, labels, average=True, backend=backend, logit_scale=logit_scale,
                                            softcap=softcap), (logits,))


def test_sequence_logprobs_and_torch_compile():
    logits, labels = make_logits((2, 8), 33, torch.float32, seed=6)
    labels[0, 1] = 4
    ref = reference_token_logprobs(logits, labels, logit_scale=0.5, softcap=20.0)
    seq = pyalign.sequence_logprobs(logits, labels, logit_scale=0.5, softcap=20.0)
    torch.testing.assert_close(seq, ref.sum(-1).float(), atol=1e-4, rtol=1e-5)

    def loss(x):
        logp = pyalign.sequence_logprobs(x, labels, softcap=20.0, logit_scale=0.5)
        return torch.nn.functional.logsigmoid(0.1 * (logp[0] - logp[1]))

    eager_in = logits.detach().clone().requires_grad_()
    compiled_in = logits.detach().clone().requires_grad_()
    eager = loss(eager_in)
    compiled = torch.compile(loss, fullgraph=True)(compiled_in)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)


def test_defaults_are_the_untransformed_op():
    logits, labels = make_logits((2, 5), 100, torch.float32, seed=7)
    plain = pyalign.token_logprobs(logits, labels)
    assert torch.equal(pyalign.token_logprobs(logits, labels, logit_scale=1.0, softcap=None), plain)
    assert torch.equal(pyalign.token_logprobs(logits, labels, logit_scale=1), plain)


BAD_TRANSFORMS = [
    (dict(logit_scale=0.0), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=-0.5), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=float("inf")), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=float("nan")), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=True), "logit_scale: expected a finite positive float, got True"),
    (dict(logit_scale="2"), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=None), "logit_scale: expected a finite positive float"),
    (dict(logit_scale=torch.tensor(2.0)), "logit_scale: expected a finite positive float"),
    (dict(softcap=0.0), "softcap: expected None or a finite positive float"),
    (dict(softcap=-30.0), "softcap: expected None or a finite positive float"),
    (dict(softcap=float("inf")), "softcap: expected None or a finite positive float"),
    (dict(softcap=False), "softcap: expected None or a finite positive float, got False"),
    (dict(softcap="30"), "softcap: expected None or a finite positive float"),
]


@pytest.mark.parametrize("bad, message", BAD_TRANSFORMS)
def test_bad_transform_names_the_argument(bad, message):
    logits, labels = make_logits((2, 3), 10, torch.float32)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(10, 4)
    calls = [
        lambda: pyalign.token_logprobs(logits, labels, **bad),
        lambda: pyalign.sequence_logprobs(logits, labels, **bad),
        lambda: pyalign.linear_token_logprobs(hidden, weight, labels.cpu(), **bad),
        lambda: reference_token_logprobs(logits, labels, **bad),
        lambda: reference_token_stats(logits, labels, **bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


# ----------------------------------------------------------------------------- fused lm_head


def linear_case(dtype=torch.float32, *, seed=0, rows=2, time=11, width=16, vocab=53, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, time, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 9 / width ** 0.5
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows, time), generator=gen)
    labels[torch.rand(rows, time, generator=gen) < 0.25] = -100
    labels[-1] = -100
    upstream = torch.randn(rows, time, generator=gen, dtype=torch.float64)
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(hidden), move(weight), move(bias), labels.to(device), upstream.to(device)


def run_linear(case, requires, fused, **kwargs):
    hidden, weight, bias, labels, upstream = case
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]
    if fused:
        out = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], **kwargs)
    else:
        out = reference_token_logprobs(leaves[0] @ leaves[1].T + leaves[2], labels, **kwargs)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("mode", ["default", "low_memory"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_values_and_three_gradients(backend, mode, transform):
    """hidden, weight and bias (the vocabulary-major backward, its column-0 rewrite included) and
    the frozen-weight path (hidden's gradient formed in the forward), several chunks."""
    logit_scale, softcap = transform
    case = linear_case(seed=1)
    for requires in [(True, True, True), (True, False, False), (False, True, False)]:
        for chunk_size in (None, 4):
            out, grads = run_linear(case, requires, True, mode=mode, chunk_size=chunk_size, backend=backend,
                                    logit_scale=logit_scale, softcap=softcap)
            ref, ref_grads = run_linear(case, requires, False, logit_scale=logit_scale, softcap=softcap)
            torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=2e-5)
            assert torch.all(out[case[3] == -100] == 0)
            for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
                assert (grad is None) == (ref_grad is None), name
                if grad is not None:
                    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=5e-5, rtol=5e-5,
                                               msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_half_precision(dtype):
    """Half-precision inputs: against the float64 truth, as close as the materialised logits of
    the same dtype with the transform applied by the reference."""
    case = linear_case(dtype, seed=2, time=20, vocab=70)
    as_double = [t.double() if t.is_floating_point() else t for t in case]
    for logit_scale, softcap in TRANSFORMS:
        out, grads = run_linear(case, (True, True, True), True, chunk_size=8, logit_scale=logit_scale,
                                softcap=softcap)
        eager, eager_grads = run_linear(case, (True, True, True), False, logit_scale=logit_scale, softcap=softcap)
        truth, truth_grads = run_linear(as_double, (True, True, True), False, logit_scale=logit_scale,
                                        softcap=softcap)
        for ours, materialised, exact in zip([out, *grads], [eager, *eager_grads], [truth, *truth_grads]):
            ours_err = (ours.double() - exact).abs().max().item()
            eager_err = (materialised.double() - exact).abs().max().item()
            assert ours_err <= 2 * eager_err + 1e-6


def test_linear_gradcheck():
    hidden, weight, bias, labels, _ = linear_case(torch.float64, seed=3, time=3, width=4, vocab=6)
    labels[0, 0] = 1
    for logit_scale, softcap in [(0.5, None), (1.5, 2.0)]:
        for mode in ("default", "low_memory"):
            for requires in [(True, True, True), (True, False, False)]:
                inputs = [t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]

                def fn(h, w, b, mode=mode, s=logit_scale, c=softcap):
                    return pyalign.linear_token_logprobs(h, w, labels, bias=b, mode=mode, chunk_size=2,
                                                         logit_scale=s, softcap=c)

                assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_stats_are_of_the_transformed_logits(backend, transform):
    """return_stats: entropy, mean logit, log sum p^2 of z, the logits' argmax and is_top1, with and
    without gradients (the frozen-weight path overwrites each chunk after reading it)."""
    logit_scale, softcap = transform
    hidden, weight, bias, labels, upstream = linear_case(seed=4)
    with torch.no_grad():
        logits = hidden @ weight.T + bias
        labels[0, :3] = logits[0, :3].argmax(-1)
    ref = reference_token_stats(logits, labels, logit_scale=logit_scale, softcap=softcap)
    ref_logp = reference_token_logprobs(logits, labels, logit_scale=logit_scale, softcap=softcap)
    for frozen in (None, (True, False, False)):
        leaves = [hidden, weight, bias] if frozen is None else [
            t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), frozen)]
        with torch.set_grad_enabled(frozen is not None):
            out, stats = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=5,
                                                       backend=backend, return_stats=True, logit_scale=logit_scale,
                                                       softcap=softcap)
        torch.testing.assert_close(out, ref_logp.float(), atol=2e-5, rtol=2e-5)
        for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
            torch.testing.assert_close(stats[name].double(), ref[name].double(), atol=3e-5, rtol=3e-5, msg=name)
        assert torch.equal(stats["argmax"], ref["argmax"]) and torch.equal(stats["is_top1"], ref["is_top1"])
        assert stats["is_top1"][0, :3].all()


# ----------------------------------------------------------------------------- vocabulary-parallel

WORLD = 2
HIDDEN = 8
VP_CASES = [  # (dtype, logit_scale, softcap, frozen weight, mode, bias offset)
    (torch.float64, 0.125, None, False, "default", 0.0),
    (torch.float64, 1.0, 30.0, False, "low_memory", 0.0),
    (torch.float64, 2.0, 3.0, True, "default", 0.0),     # frozen: shares formed in the forward
    (torch.float32, 4.0, None, True, "default", 0.0),
    (torch.float32, 1.5, 5.0, False, "default", 0.0),
    # Logits ~ 1e7 (exact small integers on top in float32): the merge of the shards' normalisers
    # keeps the maximum and the log-sum apart, like the kernels.
    (torch.float32, 1.0, None, False, "default", 1.0e7),
    (torch.float32, 1.0, None, True, "default", 1.0e7),
]


def vp_inputs(dtype, offset, vocab=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if offset:  # integers: every logit exact in float32, so the answer is known exactly
        weight = torch.randint(-3, 4, (vocab, HIDDEN), generator=gen).to(dtype)
        bias = (offset + torch.randint(-20, 20, (vocab,), generator=gen)).to(dtype)
        hidden = [torch.randint(-2, 3, (2, 4, HIDDEN), generator=gen).to(dtype) for _ in range(WORLD)]
    else:
        weight = (torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64) * 2).to(dtype)
        bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
        hidden = [torch.randn(2, 4, HIDDEN, generator=gen, dtype=torch.float64).to(dtype) for _ in range(WORLD)]
    labels = [torch.randint(0, vocab, (2, 4), generator=gen) for _ in range(WORLD)]
    labels[0][0, :2] = -100
    grads = [torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(WORLD)]
    return weight, bias, hidden, labels, grads


def _vp_scenario(rank: int) -> list[dict]:
    from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs

    results = []
    for dtype, logit_scale, softcap, frozen, mode, offset in VP_CASES:
        weight, bias, hidden, labels, grads = vp_inputs(dtype, offset)
        start, end = shard_range(weight.shape[0], rank, WORLD)
        h = hidden[rank].clone().requires_grad_(True)
        w = weight[start:end].clone().requires_grad_(not frozen)
        b = bias[start:end].clone().requires_grad_(not frozen)
        logp = vocab_parallel_token_logprobs(h, w, labels[rank], bias=b, vocab_start=start,
                                             vocab_size=weight.shape[0], chunk_size=3, mode=mode,
                                             logit_scale=logit_scale, softcap=softcap)
        (logp.double() * grads[rank]).sum().backward()
        results.append(dict(logp=logp.detach(), grad_hidden=h.grad, rows=(start, end),
                            grad_weight=None if frozen else w.grad, grad_bias=None if frozen else b.grad))
    return results


def test_vocab_parallel_against_the_reference(tmp_path):
    results = run_gloo(tmp_path, _vp_scenario, world=WORLD)
    for case, (dtype, logit_scale, softcap, frozen, mode, offset) in enumerate(VP_CASES):
        weight, bias, hidden, labels, grads = vp_inputs(dtype, offset)
        name = f"{dtype} scale={logit_scale} cap={softcap} frozen={frozen} {mode} offset={offset}"
        h64 = torch.cat(hidden).double().clone().requires_grad_(True)
        w64 = weight.double().clone().requires_grad_(True)
        b64 = bias.double().clone().requires_grad_(True)
        ref = reference_token_logprobs(h64 @ w64.T + b64, torch.cat(labels), logit_scale=logit_scale,
                                       softcap=softcap)
        (ref * torch.cat(grads)).sum().backward()
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-5)
        weight_grad = torch.zeros_like(w64)
        bias_grad = torch.zeros_like(b64)
        for rank, result in enumerate(results):
            got = result[case]
            rows = slice(2 * rank, 2 * rank + 2)
            torch.testing.assert_close(got["logp"].double(), ref[rows].detach(), **tol, msg=name)
            torch.testing.assert_close(got["grad_hidden"].double(), h64.grad[rows], **tol, msg=name)
            if not frozen:
                start, end = got["rows"]
                weight_grad[start:end] = got["grad_weight"].double()
                bias_grad[start:end] = got["grad_bias"].double()
        if not frozen:
            torch.testing.assert_close(weight_grad, w64.grad, **tol, msg=name)
            torch.testing.assert_close(bias_grad, b64.grad, **tol, msg=name)


def test_vocab_parallel_single_process():
    from pyalign.ops.vocab_parallel_logprobs import vocab_parallel_token_logprobs

    weight, bias, hidden, labels, grads = vp_inputs(torch.float64, 0.0)
    for logit_scale, softcap in TRANSFORMS:
        h = hidden[0].clone().requires_grad_()
        logp = vocab_parallel_token_logprobs(h, weight, labels[0], bias=bias, chunk_size=3,
                                             logit_scale=logit_scale, softcap=softcap)
        ref = reference_token_logprobs(hidden[0] @ weight.T + bias, labels[0], logit_scale=logit_scale,
                                       softcap=softcap)
        torch.testing.assert_close(logp, ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="softcap: expected None or a finite positive float"):
        vocab_parallel_token_logprobs(hidden[0], weight, labels[0], softcap=-1.0)


def test_softcap_bench_writes_checked_numbers(tmp_path):
    """``python -m bench.softcap`` at a tiny size: every variant timed, checked against float64."""
    from bench import softcap

    threads = torch.get_num_threads()
    try:
        payload = softcap.main(["--shapes", "32x300", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = payload["rows"]
    assert [row["variant"] for row in rows] == list(softcap.VARIANTS)
    for row in rows:
        assert row["max_abs_err_vs_float64"] < 1e-5
        assert all(row[measure] > 0 for measure in ("forward", "fwd+bwd", "kernel fwd", "kernel bwd"))
    assert payload["environment"]["command"].startswith("python -m bench.softcap")
    assert len(list(tmp_path.glob("softcap_*.json"))) == 1 and len(list(tmp_path.glob("softcap_*.md"))) == 1
