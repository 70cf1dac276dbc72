"""Direct tests of the C++ CPU kernels, pyalign._C.cpu_forward / cpu_backward.

Every instruction-set variant compiled into the extension that this CPU can run (DEFAULT, AVX2,
AVX512) is checked against a float64 computation on the same input values, so bfloat16/float16
inputs are compared exactly as the kernel sees them: plain logits, the logit transforms
(logit_scale, softcap) and rows at extreme offsets (the exact answer computed in float64 on the
logits minus their row maximum).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from pyalign.reference import normalised_logprobs, row_normaliser, transform_derivative

_C = pytest.importorskip("pyalign._C", reason="the C++ extension is not built (make build)")

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 7, 1000, 4099, 50257]
# (logit_scale, softcap): none, Cohere/Granite-like scales, Gemma-like soft-caps, both at once.
TRANSFORMS = [(1.0, None), (0.0625, None), (2.5, None), (1.0, 30.0), (1.7, 5.0)]


@pytest.fixture(params=_C.cpu_capabilities())
def capability(request):
    previous = _C.cpu_capability()
    _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(previous)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def expected(logits3, labels2, grad2, logit_scale=1.0, softcap=None):
    """(logp, norm, grad) in float64 from the very values the kernel reads, through the
    reference's formulas (norm = each row's (max y, log-sum)): the row maximum is subtracted in
    float64 before anything else, so these are exact at any offset. Ignored rows get a zero
    gradient whatever they hold; their norm is unspecified."""
    x = logits3.double()
    norm = row_normaliser(x, logit_scale, softcap)
    keep = labels2 != IGNORE
    safe = torch.where(keep, labels2, 0)
    log_p = normalised_logprobs(x, norm, logit_scale, softcap)
    logp = torch.where(keep, log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    g = torch.where(keep, grad2.double(), 0.0)
    grad = -torch.exp(log_p) * g.unsqueeze(-1)
    grad.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
    grad = grad * transform_derivative(x, logit_scale, softcap)
    grad = torch.where(keep.unsqueeze(-1), grad, 0.0)
    return logp, norm, grad


def assert_norm_close_on_kept_rows(norm, want_norm, labels2, **tolerances):
    """norm is unspecified where the label is ignored (docs/DESIGN.md): compare kept rows only."""
    keep = labels2 != IGNORE
    torch.testing.assert_close(norm.double()[keep], want_norm[keep], **tolerances)


def grad_tolerances(dtype, grad2):
    """The gradient is computed in float32 (float64) and rounded once to the logits' dtype."""
    scale = float(grad2.abs().max()) if grad2.numel() else 1.0
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12 * scale),
        torch.float32: dict(rtol=1e-5, atol=3e-6 * scale),
        torch.bfloat16: dict(rtol=8e-3, atol=1e-5 * scale),
        torch.float16: dict(rtol=1e-3, atol=1e-6 * scale),  # below 6e-5, float16 is subnormal
    }[dtype]


def value_tolerances(dtype):
    # Inputs are exact in every dtype: only float32 accumulation separates kernel and reference.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-5)


def run_and_check(logits3, labels2, grad2, grad_out3=None, logit_scale=1.0, softcap=None):
    dtype = logits3.dtype
    want_logp, want_norm, want_grad = expected(logits3, labels2, grad2, logit_scale, softcap)
    logp, norm = _C.cpu_forward(logits3, labels2, IGNORE, logit_scale, softcap)
    assert logp.dtype == norm.dtype == acc_dtype(dtype)
    assert logp.shape == labels2.shape and norm.shape == (*labels2.shape, 2)
    assert logp.is_contiguous() and norm.is_contiguous()
    torch.testing.assert_close(logp.double(), want_logp, **value_tolerances(dtype))
    assert_norm_close_on_kept_rows(norm, want_norm, labels2, **value_tolerances(dtype))

    if grad_out3 is None:
        grad_out3 = torch.full_like(logits3, float("nan"))  # every element must be written
    _C.cpu_backward(logits3, labels2, norm, grad2, IGNORE, grad_out3, logit_scale, softcap)
    torch.testing.assert_close(grad_out3.double(), want_grad, **grad_tolerances(dtype, grad2))
    return logp, norm, grad_out3


def random_case(batch, seq, vocab, dtype, *, seed, scale=3.0, ignore_fraction=0.25):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_fraction] = IGNORE
    grad = torch.randn(batch, seq, generator=gen, dtype=acc_dtype(dtype))
    return logits, labels, grad


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(capability, dtype, vocab):
    logits, labels, grad = random_case(2, 3, vocab, dtype, seed=vocab)
    run_and_check(logits, labels, grad)


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=str)
@pytest.mark.parametrize("vocab", [7, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transforms_match_float64(capability, dtype, vocab, transform):
    logit_scale, softcap = transform
    # Rows start at every offset (logits[:, :-1] of an odd vocabulary), ignored labels, and a
    # fully ignored sequence.
    full, labels, grad = random_case(3, 5, vocab, dtype, seed=vocab + 11, scale=6.0)
    labels[2] = IGNORE
    run_and_check(full[:, :-1], labels[:, :-1].contiguous(), grad[:, :-1].contiguous(),
                  logit_scale=logit_scale, softcap=softcap)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_extreme_offsets_are_exact(capability, dtype, transform):
    """Rows offset by 1e3 ... 1e30, and rows with one huge logit among ordinary ones, against the
    exact answer (float64 on the logits minus their row maximum). A normaliser kept as one float32
    log-sum-exp gave gradient errors of 2e-5 at 1e3, 0.2 at 1e7, and at 1e16 log-probs of 0
    instead of -log V with gradient rows summing to V - 1."""
    logit_scale, softcap = transform
    vocab = 2 * 4096 + 333
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(9, vocab, generator=gen, dtype=torch.float64) * 3
    offsets = torch.tensor([0.0, 1e3, 1e5, 1e7, 1e16, 1e30, -1e30], dtype=torch.float64)
    rows = torch.cat([base[:7] + offsets.unsqueeze(1), base[7:]])
    rows[7, 5000] = 1e30  # one huge value, the rest ordinary
    rows[8, 17] = 1e7     # in the first block
    logits = rows.to(dtype).view(3, 3, vocab)
    labels = torch.randint(0, vocab, (3, 3), generator=gen)
    labels[2, 1] = 5000  # the huge value's own label: log p = 0
    grad = torch.randn(3, 3, generator=gen, dtype=acc_dtype(dtype))
    logp, norm, grad_out = run_and_check(logits, labels, grad, logit_scale=logit_scale, softcap=softcap)
    assert torch.isfinite(logp).all() and torch.isfinite(grad_out).all()
    assert logp[2, 1].item() == 0.0 or softcap is not None
    if softcap is None and logit_scale == 1.0 and dtype != torch.float64:
        # float32 rows at 1e16 hold one value: uniform, log p = -log V exactly as float32 has it.
        uniform = torch.tensor(-math.log(vocab), dtype=torch.float32)
        assert torch.allclose(logp[1, 1], uniform, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_128k_vocab(capability, dtype):
    logits, labels, grad = random_case(1, 2, 128256, dtype, seed=1, ignore_fraction=0.0)
    run_and_check(logits, labels, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_ignored_sequence_has_zero_logp_and_zero_grad(capability, dtype):
    logits, labels, grad = random_case(3, 4, 1000, dtype, seed=2)
    labels[1] = IGNORE
    logp, norm, grad_out = run_and_check(logits, labels, grad)
    assert torch.all(logp[1] == 0)
    assert torch.all(grad_out[1] == 0)
    assert torch.isfinite(norm[labels != IGNORE]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("transform", [(1.0, None), (1.7, 5.0)], ids=str)
def test_ignored_rows_are_not_read(capability, dtype, poison, transform):
    """Every ignored row is poisoned with NaN or inf, which any read would carry into that row's
    norm, its logp or its gradient. The contract leaves norm unspecified there; this kernel writes
    0 without reading the row, and the kept rows are unaffected."""
    logits, labels, grad = random_case(3, 5, 1000, dtype, seed=8, ignore_fraction=0.4)
    labels[2] = IGNORE  # a fully ignored sequence too
    ignored = labels == IGNORE
    assert ignored.any() and (~ignored).any()
    logits[ignored] = poison
    logp, norm, grad_out = run_and_check(logits, labels, grad, logit_scale=transform[0], softcap=transform[1])
    assert torch.all(logp[ignored] == 0) and torch.all(norm[ignored] == 0)
    assert torch.isfinite(logp[~ignored]).all() and torch.isfinite(norm[~ignored]).all()
    assert torch.all(grad_out[ignored] == 0)
    assert torch.isfinite(grad_out[~ignored]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_rows(capability, dtype):
    # The usual causal-LM shift, logits[:, :-1] of [B, T + 1, V], with an odd vocabulary so rows
    # start at every offset; and a [T, B, V] buffer viewed as [B, T, V] (stride(0) < stride(1)).
    full, labels, grad = random_case(2, 6, 4099, dtype, seed=3)
    shifted = full[:, :-1]
    assert not shifted.is_contiguous()
    run_and_check(shifted, labels[:, :-1].contiguous(), grad[:, :-1].contiguous())

    time_major, labels, grad = random_case(5, 2, 1000, dtype, seed=4)
    transposed = time_major.transpose(0, 1)
    run_and_check(transposed, labels.t().contiguous(), grad.t().contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, None), (2.0, 10.0)], ids=str)
def test_in_place_backward(capability, dtype, transform):
    full, labels, grad = random_case(2, 5, 4099, dtype, seed=5)
    logits = full[:, :-1]  # in place on a strided view too
    labels, grad = labels[:, :-1].contiguous(), grad[:, :-1].contiguous()
    _, _, want_grad = expected(logits, labels, grad, *transform)
    logp, norm = _C.cpu_forward(logits, labels, IGNORE, *transform)
    _C.cpu_backward(logits, labels, norm, grad, IGNORE, logits, *transform)
    torch.testing.assert_close(logits.double(), want_grad, **grad_tolerances(dtype, grad))
    assert torch.equal(full[:, -1], random_case(2, 5, 4099, dtype, seed=5)[0][:, -1])


def test_arbitrary_upstream_gradient(capability):
    logits, labels, _ = random_case(2, 8, 1000, torch.float32, seed=6, ignore_fraction=0.0)
    grad = torch.tensor([[0.0, -3.0, 1e-8, 1e4, 2.5, -0.0, 7.0, -1e-3]] * 2)
    _, _, grad_out = run_and_check(logits, labels, grad)
    assert torch.all(grad_out[:, 0] == 0)  # zero upstream gradient, zero row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("transform", [(1.0, None), (0.3, None), (1.0, 20.0)], ids=str)
def test_extreme_rows(capability, dtype, transform):
    """Rows that exercise the blocked online maximum and sum: a maximum far beyond the first block
    (rescale), leading -inf blocks (masked vocabulary; soft-capped, -inf is -softcap and counts),
    a single finite entry, large offsets, a very peaked row."""
    vocab = 3 * 4096 + 77
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(6, vocab, generator=gen, dtype=torch.float64)
    rows[0, 9000] = 150.0  # a late block overshoots the first block's max by far
    rows[1, 5000:5100] += 60.0  # within the slack: summed against the old shift
    rows[2, :4096 + 13] = float("-inf")  # first block (and more) masked out
    rows[3, :] = float("-inf")
    rows[3, 11] = 2.0  # only the label's entry is finite
    rows[4] += 1.0e4  # large common offset
    rows[5] = rows[5] * 40.0  # very peaked softmax
    logits = rows.to(dtype).view(2, 3, vocab)
    labels = torch.tensor([[9000, 5050, 4200], [11, 3, 12000]])
    grad = torch.randn(2, 3, generator=gen, dtype=acc_dtype(dtype))
    run_and_check(logits, labels, grad, logit_scale=transform[0], softcap=transform[1])


def test_nan_logit_gives_nan_like_eager(capability):
    logits = torch.randn(1, 2, 5000)
    logits[0, 0, 4500] = float("nan")
    labels = torch.tensor([[1, 2]])
    for transform in TRANSFORMS:
        logp, norm = _C.cpu_forward(logits, labels, IGNORE, *transform)
        assert torch.isnan(norm[0, 0]).any() and torch.isnan(logp[0, 0])
        assert torch.isfinite(norm[0, 1]).all() and torch.isfinite(logp[0, 1])


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_gradcheck_float64(transform):
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits3, labels2):
            logp, norm = _C.cpu_forward(logits3, labels2, IGNORE, *transform)
            ctx.save_for_backward(logits3, labels2, norm)
            return logp

        @staticmethod
        def backward(ctx, grad):
            logits3, labels2, norm = ctx.saved_tensors
            out = torch.empty_like(logits3)
            _C.cpu_backward(logits3, labels2, norm, grad.contiguous(), IGNORE, out, *transform)
            return out, None

    logits = (torch.randn(2, 3, 11, dtype=torch.float64) * 4).requires_grad_(True)
    labels = torch.tensor([[1, IGNORE, 10], [0, 5, IGNORE]])
    assert torch.autograd.gradcheck(lambda x: Op.apply(x, labels), (logits,))


def test_empty_inputs():
    for shape in [(0, 4, 7), (2, 0, 7)]:
        logits = torch.randn(shape)
        labels = torch.zeros(shape[:2], dtype=torch.long)
        logp, norm = _C.cpu_forward(logits, labels, IGNORE)
        assert logp.shape == shape[:2] and norm.shape == (*shape[:2], 2)
        grad_out = torch.empty_like(logits)
        _C.cpu_backward(logits, labels, norm, torch.zeros(shape[:2]), IGNORE, grad_out)


def test_contract_violations_raise_value_error():
    logits = torch.randn(2, 3, 7)
    labels = torch.zeros(2, 3, dtype=torch.long)
    logp, norm = _C.cpu_forward(logits, labels, IGNORE)
    grad = torch.ones(2, 3)
    cases = {
        "logits3": lambda: _C.cpu_forward(logits[0], labels, IGNORE),
        "stride": lambda: _C.cpu_forward(logits.transpose(1, 2), labels[:, :2].contiguous(), IGNORE),
        "labels2: expected dtype": lambda: _C.cpu_forward(logits, labels.int(), IGNORE),
        "labels2: expected shape": lambda: _C.cpu_forward(logits, labels[:, :2], IGNORE),
        "outside [0, 7)": lambda: _C.cpu_forward(logits, labels + 7, IGNORE),
        "logits3: expected float32": lambda: _C.cpu_forward(logits.int(), labels, IGNORE),
        "grad2": lambda: _C.cpu_backward(logits, labels, norm, grad.double(), IGNORE, logits.clone()),
        "grad_out3: expected the logits' dtype":
            lambda: _C.cpu_backward(logits, labels, norm, grad, IGNORE, logits.double()),
        "partially overlapping":
            lambda: _C.cpu_backward(logits[:, :2], labels[:, :2].contiguous(), norm[:, :2].contiguous(),
                                    grad[:, :2].contiguous(), IGNORE, logits[:, 1:]),
        "norm2: expected shape [2, 3, 2]":
            lambda: _C.cpu_backward(logits, labels, norm[..., 0].contiguous(), grad, IGNORE, logits.clone()),
        "logit_scale: expected a finite positive float": lambda: _C.cpu_forward(logits, labels, IGNORE, 0.0),
        "logit_scale: expected a finite positive float, got inf":
            lambda: _C.cpu_backward(logits, labels, norm, grad, IGNORE, logits.clone(), float("inf")),
        "softcap: expected None or a finite positive float": lambda: _C.cpu_forward(logits, labels, IGNORE, 1.0, -2.0),
        "softcap: expected None or a finite positive float, got nan":
            lambda: _C.cpu_backward(logits, labels, norm, grad, IGNORE, logits.clone(), 1.0, float("nan")),
    }
    for message, call in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_capability_selection():
    available = _C.cpu_capabilities()
    assert "DEFAULT" in available and _C.cpu_capability() in available
    with pytest.raises(ValueError, match="capability"):
        _C.set_cpu_capability("NEON9000")
    assert _C.has_cuda() in (True, False)


@pytest.fixture
def two_threads():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU core: nothing to parallelise over")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_forward_and_backward_run_on_several_threads(two_threads):
    """A build without OpenMP compiles at::parallel_for into a serial loop, silently: the kernel
    records which of ATen's threads ran a chunk, and both passes must use more than one."""
    logits = torch.randn(4, 64, 4099)
    labels = torch.randint(0, 4099, (4, 64))
    logp, norm = _C.cpu_forward(logits, labels, IGNORE)
    assert _C.cpu_threads_used_by_last_call() == 2
    _C.cpu_backward(logits, labels, norm, torch.ones_like(logp), IGNORE, torch.empty_like(logits))
    assert _C.cpu_threads_used_by_last_call() == 2


def test_one_thread_when_torch_has_one():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _C.cpu_forward(torch.randn(2, 32, 999), torch.randint(0, 999, (2, 32)), IGNORE)
        assert _C.cpu_threads_used_by_last_call() == 1
    finally:
        torch.set_num_threads(previous)


def test_one_openmp_runtime_in_the_process():
    """The extension uses the OpenMP runtime torch loaded, not a second copy (two runtimes mean
    two thread pools fighting over the cores, and torch.set_num_threads reaching only one)."""
    _C.cpu_forward(torch.randn(2, 8, 99), torch.randint(0, 99, (2, 8)), IGNORE)
    with open("/proc/self/maps", encoding="utf-8") as maps:
        runtimes = {os.path.realpath(path) for path in re.findall(r"(/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[.\d]*)", maps.read())}
    assert len(runtimes) == 1, runtimes
