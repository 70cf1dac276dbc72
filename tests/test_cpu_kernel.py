"""Direct tests of the C++ CPU kernels, pyalign._C.cpu_forward / cpu_backward.

Every instruction-set variant compiled into the extension that this CPU can run (DEFAULT, AVX2,
AVX512) is checked against a float64 computation on the same input values, so bfloat16/float16
inputs are compared exactly as the kernel sees them.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

_C = pytest.importorskip("pyalign._C", reason="the C++ extension is not built (make build)")

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 7, 1000, 4099, 50257]


@pytest.fixture(params=_C.cpu_capabilities())
def capability(request):
    previous = _C.cpu_capability()
    _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(previous)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def expected(logits3, labels2, grad2, lse_for_grad=None):
    """(logp, lse, grad) in float64 from the very values the kernel reads; the gradient uses
    `lse_for_grad` when given (the backward's contract is relative to the lse it receives).
    Ignored rows get a zero gradient whatever they hold; their lse is unspecified."""
    x = logits3.double()
    lse = torch.logsumexp(x, dim=-1)
    keep = labels2 != IGNORE
    safe = torch.where(keep, labels2, 0)
    logp = torch.where(keep, x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse, 0.0)
    g = torch.where(keep, grad2.double(), 0.0)
    grad_lse = lse if lse_for_grad is None else lse_for_grad.double()
    grad = -torch.exp(x - grad_lse.unsqueeze(-1)) * g.unsqueeze(-1)
    grad = torch.where(keep.unsqueeze(-1), grad, 0.0)
    grad.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
    return logp, lse, grad


def assert_lse_close_on_kept_rows(lse, want_lse, labels2, **tolerances):
    """lse is unspecified where the label is ignored (docs/DESIGN.md): compare kept rows only."""
    keep = labels2 != IGNORE
    torch.testing.assert_close(lse.double()[keep], want_lse[keep], **tolerances)


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


def run_and_check(logits3, labels2, grad2, grad_out3=None):
    dtype = logits3.dtype
    want_logp, want_lse, want_grad = expected(logits3, labels2, grad2)
    logp, lse = _C.cpu_forward(logits3, labels2, IGNORE)
    assert logp.dtype == lse.dtype == acc_dtype(dtype)
    assert logp.shape == lse.shape == labels2.shape and logp.is_contiguous()
    torch.testing.assert_close(logp.double(), want_logp, **value_tolerances(dtype))
    assert_lse_close_on_kept_rows(lse, want_lse, labels2, **value_tolerances(dtype))

    if grad_out3 is None:
        grad_out3 = torch.full_like(logits3, float("nan"))  # every element must be written
    _C.cpu_backward(logits3, labels2, lse, grad2, IGNORE, grad_out3)
    torch.testing.assert_close(grad_out3.double(), want_grad, **grad_tolerances(dtype, grad2))
    return logp, lse, grad_out3


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_128k_vocab(capability, dtype):
    logits, labels, grad = random_case(1, 2, 128256, dtype, seed=1, ignore_fraction=0.0)
    run_and_check(logits, labels, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_ignored_sequence_has_zero_logp_and_zero_grad(capability, dtype):
    logits, labels, grad = random_case(3, 4, 1000, dtype, seed=2)
    labels[1] = IGNORE
    logp, lse, grad_out = run_and_check(logits, labels, grad)
    assert torch.all(logp[1] == 0)
    assert torch.all(grad_out[1] == 0)
    assert torch.isfinite(lse[labels != IGNORE]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_ignored_rows_are_not_read(capability, dtype, poison):
    """Every ignored row is poisoned with NaN or inf, which any read would carry into that row's
    lse, its logp or its gradient. The contract leaves lse unspecified there; this kernel writes 0
    without reading the row, and the kept rows are unaffected."""
    logits, labels, grad = random_case(3, 5, 1000, dtype, seed=8, ignore_fraction=0.4)
    labels[2] = IGNORE  # a fully ignored sequence too
    ignored = labels == IGNORE
    assert ignored.any() and (~ignored).any()
    logits[ignored] = poison
    logp, lse, grad_out = run_and_check(logits, labels, grad)  # kept rows against float64
    assert torch.all(logp[ignored] == 0) and torch.all(lse[ignored] == 0)
    assert torch.isfinite(logp[~ignored]).all() and torch.isfinite(lse[~ignored]).all()
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
def test_in_place_backward(capability, dtype):
    full, labels, grad = random_case(2, 5, 4099, dtype, seed=5)
    logits = full[:, :-1]  # in place on a strided view too
    labels, grad = labels[:, :-1].contiguous(), grad[:, :-1].contiguous()
    want_logp, _, want_grad = expected(logits, labels, grad)
    logp, lse = _C.cpu_forward(logits, labels, IGNORE)
    _C.cpu_backward(logits, labels, lse, grad, IGNORE, logits)
    torch.testing.assert_close(logits.double(), want_grad, **grad_tolerances(dtype, grad))
    assert torch.equal(full[:, -1], random_case(2, 5, 4099, dtype, seed=5)[0][:, -1])


def test_arbitrary_upstream_gradient(capability):
    logits, labels, _ = random_case(2, 8, 1000, torch.float32, seed=6, ignore_fraction=0.0)
    grad = torch.tensor([[0.0, -3.0, 1e-8, 1e4, 2.5, -0.0, 7.0, -1e-3]] * 2)
    _, _, grad_out = run_and_check(logits, labels, grad)
    assert torch.all(grad_out[:, 0] == 0)  # zero upstream gradient, zero row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_extreme_rows(capability, dtype):
    """Rows that exercise the blocked online log-sum-exp: a maximum far beyond the first block
    (rescale), leading -inf blocks (masked vocabulary), a single finite entry, large offsets."""
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
    logp, lse = _C.cpu_forward(logits, labels, IGNORE)
    grad_out = torch.full_like(logits, float("nan"))
    _C.cpu_backward(logits, labels, lse, grad, IGNORE, grad_out)
    want_logp, want_lse, want_grad = expected(logits, labels, grad, lse_for_grad=lse)
    # lse ~ 1e4 in row 4: float32 keeps about 1e-3 absolute there, which is why the gradient is
    # compared against the float64 formula evaluated at the lse the backward was given.
    atol = 1e-10 if dtype == torch.float64 else 2e-3
    assert_lse_close_on_kept_rows(lse, want_lse, labels, rtol=1e-6, atol=atol)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-6, atol=atol)
    torch.testing.assert_close(grad_out.double(), want_grad, **grad_tolerances(dtype, grad))


def test_nan_logit_gives_nan_like_eager(capability):
    logits = torch.randn(1, 2, 5000)
    logits[0, 0, 4500] = float("nan")
    labels = torch.tensor([[1, 2]])
    logp, lse = _C.cpu_forward(logits, labels, IGNORE)
    assert torch.isnan(lse[0, 0]) and torch.isnan(logp[0, 0])
    assert torch.isfinite(lse[0, 1]) and torch.isfinite(logp[0, 1])


def test_gradcheck_float64():
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits3, labels2):
            logp, lse = _C.cpu_forward(logits3, labels2, IGNORE)
            ctx.save_for_backward(logits3, labels2, lse)
            return logp

        @staticmethod
        def backward(ctx, grad):
            logits3, labels2, lse = ctx.saved_tensors
            out = torch.empty_like(logits3)
            _C.cpu_backward(logits3, labels2, lse, grad.contiguous(), IGNORE, out)
            return out, None

    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE, 10], [0, 5, IGNORE]])
    assert torch.autograd.gradcheck(lambda x: Op.apply(x, labels), (logits,))


def test_empty_inputs():
    for shape in [(0, 4, 7), (2, 0, 7)]:
        logits = torch.randn(shape)
        labels = torch.zeros(shape[:2], dtype=torch.long)
        logp, lse = _C.cpu_forward(logits, labels, IGNORE)
        assert logp.shape == lse.shape == shape[:2]
        grad_out = torch.empty_like(logits)
        _C.cpu_backward(logits, labels, lse, torch.zeros(shape[:2]), IGNORE, grad_out)


def test_contract_violations_raise_value_error():
    logits = torch.randn(2, 3, 7)
    labels = torch.zeros(2, 3, dtype=torch.long)
    logp, lse = _C.cpu_forward(logits, labels, IGNORE)
    grad = torch.ones(2, 3)
    cases = {
        "logits3": lambda: _C.cpu_forward(logits[0], labels, IGNORE),
        "stride": lambda: _C.cpu_forward(logits.transpose(1, 2), labels[:, :2].contiguous(), IGNORE),
        "labels2: expected dtype": lambda: _C.cpu_forward(logits, labels.int(), IGNORE),
        "labels2: expected shape": lambda: _C.cpu_forward(logits, labels[:, :2], IGNORE),
        "outside [0, 7)": lambda: _C.cpu_forward(logits, labels + 7, IGNORE),
        "logits3: expected float32": lambda: _C.cpu_forward(logits.int(), labels, IGNORE),
        "grad2": lambda: _C.cpu_backward(logits, labels, lse, grad.double(), IGNORE, logits.clone()),
        "grad_out3: expected the logits' dtype":
            lambda: _C.cpu_backward(logits, labels, lse, grad, IGNORE, logits.double()),
        "partially overlapping":
            lambda: _C.cpu_backward(logits[:, :2], labels[:, :2].contiguous(), lse[:, :2].contiguous(),
                                    grad[:, :2].contiguous(), IGNORE, logits[:, 1:]),
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
    logp, lse = _C.cpu_forward(logits, labels, IGNORE)
    assert _C.cpu_threads_used_by_last_call() == 2
    _C.cpu_backward(logits, labels, lse, torch.ones_like(logp), IGNORE, torch.empty_like(logits))
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
