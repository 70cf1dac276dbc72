"""The public op on every backend against the float64 reference: values, gradients, layouts,
ignored labels, torch.compile, in-place backward, and the errors bad input must raise."""

import os
import subprocess
import sys

import pytest
import torch

import pyalign
from pyalign.reference import reference_token_logprobs
from tests.backends_under_test import (
    DEVICE, GRAD_TOL, LOGP_TOL, backends_for_device, is_interpreted,
)

BACKENDS = backends_for_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, vocab, dtype, *, ignore_fraction=0.25, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_fraction] = -100
    return logits, labels.to(DEVICE)


def check_against_reference(backend, logits, labels, *, inplace=False, upstream_seed=1):
    """Values and gradient of token_logprobs(backend) vs the float64 reference on the same input."""
    dtype = logits.dtype
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(upstream_seed))
    upstream = upstream.to(DEVICE)

    ref_in = logits.detach().clone().requires_grad_()
    ref = reference_token_logprobs(ref_in, labels)
    (ref.double() * upstream.double()).sum().backward()

    leaf = logits.detach().clone().requires_grad_()
    source = leaf * 1 if inplace else leaf  # in-place needs a non-leaf whose storage can go
    out = pyalign.token_logprobs(source, labels, backend=backend, inplace_backward=inplace)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == labels.shape
    atol, rtol = LOGP_TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)
    assert torch.all(out[labels == -100] == 0)

    (out.double() * upstream.double()).sum().backward()
    assert leaf.grad.dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(leaf.grad.double(), ref_in.grad.double(), atol=atol, rtol=rtol)
    assert torch.all(leaf.grad[labels == -100] == 0)


def vocab_sizes(backend):
    if is_interpreted(backend):
        return [1, 7, 1000]
    return [1, 7, 1000, 4099, 50257]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_grads_across_vocab_sizes(backend, dtype):
    for vocab in vocab_sizes(backend):
        shape = (2, 3) if vocab > 10000 else (2, 5)
        logits, labels = make_inputs(shape, vocab, dtype, seed=vocab)
        check_against_reference(backend, logits, labels)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not is_interpreted(b)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_128k_vocab_small_n(backend, dtype):
    logits, labels = make_inputs((1, 3), 128256, dtype, seed=7, scale=4.0)
    check_against_reference(backend, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    if backend in ("triton", "cuda"):
        pytest.skip("GPU kernels take fp32/bf16/fp16; float64 is for the reference and the C++ CPU kernel")
    logits, labels = make_inputs((2, 4), 33, torch.float64)
    check_against_reference(backend, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_shifted_logits(backend):
    full, labels = make_inputs((3, 7), 301, torch.float32)
    logits = full[:, :-1]  # the usual causal shift: rows are not uniformly strided
    assert not logits.is_contiguous()
    check_against_reference(backend, logits, labels[:, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_strided_and_extra_batch_dims(backend):
    logits, labels = make_inputs((2, 3, 4), 97, torch.float32)
    check_against_reference(backend, logits, labels)
    transposed = make_inputs((2, 5), 64, torch.float32)[0].transpose(0, 1).contiguous().transpose(0, 1)
    check_against_reference(backend, transposed, make_inputs((2, 5), 64, torch.float32)[1])
    wide = torch.randn(2, 5, 128, device=DEVICE)[..., ::2]  # vocabulary stride 2
    check_against_reference(backend, wide, make_inputs((2, 5), 64, torch.float32)[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    full, labels = make_inputs((2, 6), 257, dtype)
    check_against_reference(backend, full[:, :-1], labels[:, 1:], inplace=True)
    check_against_reference(backend, full, labels, inplace=True)


def test_inplace_backward_writes_into_the_logits_storage():
    leaf = torch.randn(2, 5, 50, device=DEVICE, requires_grad=True)
    logits = leaf * 2
    labels = torch.randint(0, 50, (2, 5), device=DEVICE)
    out = pyalign.token_logprobs(logits, labels, inplace_backward=True)
    before = logits.detach().clone()
    out.sum().backward()
    assert not torch.equal(logits.detach(), before)  # the storage now holds the gradient
    torch.testing.assert_close(leaf.grad, 2 * logits.detach())


def test_inplace_backward_refuses_a_leaf():
    leaf = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        pyalign.token_logprobs(leaf, torch.zeros(2, 3, dtype=torch.long), inplace_backward=True)


def test_inplace_backward_refuses_logits_that_share_memory():
    """An expanded view (stride 0) has one storage element for several logits: their gradients
    cannot all be written into it. Every backend is protected by the shared validation."""
    row = torch.randn(1, 5, 30, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 30, (4, 5), device=DEVICE)
    expanded = row.expand(4, 5, 30) * 1  # a non-leaf copy is fine ...
    pyalign.token_logprobs(expanded, labels, inplace_backward=True).sum().backward()
    shared = (row * 1).expand(4, 5, 30)  # ... an expanded non-leaf is not
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="inplace_backward: the logits have elements that share memory"):
            pyalign.token_logprobs(shared, labels, backend=backend, inplace_backward=True)
    out = pyalign.token_logprobs(shared, labels)  # out of place: a fresh gradient, correct
    out.sum().backward()
    from pyalign.ops.token_logprobs import has_self_overlap

    x = torch.empty(4, 6, 10)
    assert not has_self_overlap(x) and not has_self_overlap(x[:, :-1]) and not has_self_overlap(x[..., ::2])
    assert has_self_overlap(x[:1].expand(4, 6, 10)) and has_self_overlap(x.as_strided((4, 6, 10), (60, 5, 1)))


def test_label_check_on_the_host_only_where_it_costs_no_sync(monkeypatch):
    """CPU tensors (and the float64 reference) are checked with a ValueError; on a GPU the check
    would read a value back every call (a sync that also breaks CUDA-graph capture), so there the
    kernels turn a bad label into NaN instead, unless PYALIGN_CHECK_LABELS=1 asks for the check."""
    from pyalign.ops.token_logprobs import CHECK_LABELS_ENV, labels_checked_on_host

    monkeypatch.delenv(CHECK_LABELS_ENV, raising=False)
    on_cpu, elsewhere = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long, device="meta")
    assert labels_checked_on_host(on_cpu, "cpu") and labels_checked_on_host(on_cpu, "triton")
    assert labels_checked_on_host(elsewhere, "torch")
    assert not labels_checked_on_host(elsewhere, "triton") and not labels_checked_on_host(elsewhere, "cuda")
    monkeypatch.setenv(CHECK_LABELS_ENV, "1")
    assert labels_checked_on_host(elsewhere, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_gpu(backend):
    """Forward and backward captured in a CUDA graph (what torch.compile's reduce-overhead mode
    does): possible only because nothing on the path reads a value back to the host."""
    if backend not in pyalign.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    logits, labels = make_inputs((4, 64), 1000, torch.bfloat16)
    logits = logits.requires_grad_()
    upstream = torch.randn(4, 64, device="cuda")

    def step():
        out = pyalign.token_logprobs(logits, labels, backend=backend)
        return torch.autograd.grad((out * upstream).sum(), logits)[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            expected = step()  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_sequence_is_finite_with_zero_gradient(backend):
    logits, labels = make_inputs((3, 6), 40, torch.float32)
    labels[1] = -100
    leaf = logits.clone().requires_grad_()
    for average in (False, True):
        seq = pyalign.sequence_logprobs(leaf, labels, average=average, backend=backend)
        assert torch.isfinite(seq).all() and seq[1].item() == 0.0
        leaf.grad = None
        seq.sum().backward()
        assert torch.isfinite(leaf.grad).all()
        assert torch.count_nonzero(leaf.grad[1]) == 0
        assert torch.count_nonzero(leaf.grad[0]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_sum_and_average(backend):
    logits, labels = make_inputs((4, 9), 55, torch.float32)
    ref = reference_token_logprobs(logits, labels)
    total = pyalign.sequence_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(total, ref.sum(-1), atol=1e-4, rtol=1e-5)
    mean = pyalign.sequence_logprobs(logits, labels, average=True, backend=backend)
    count = (labels != -100).sum(-1).clamp(min=1)
    torch.testing.assert_close(mean, ref.sum(-1) / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
def test_gradcheck(backend):
    logits, labels = make_inputs((2, 3), 6, torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: pyalign.token_logprobs(x, labels, backend=backend), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda x: pyalign.sequence_logprobs(x, labels, average=True, backend=backend), (logits,)
    )


def test_torch_compile_without_graph_break():
    logits, labels = make_inputs((2, 8), 33, torch.float32)

    def dpo_like(x):
        logp = pyalign.sequence_logprobs(x[:, :-1], labels[:, 1:])
        return torch.nn.functional.logsigmoid(0.1 * (logp[0] - logp[1]))

    compiled = torch.compile(dpo_like, fullgraph=True)  # fullgraph: a graph break is an error
    eager_in = logits.clone().requires_grad_()
    compiled_in = logits.clone().requires_grad_()
    eager = dpo_like(eager_in)
    out = compiled(compiled_in)
    torch.testing.assert_close(out, eager)
    eager.backward()
    out.backward()
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)


def test_first_call_imports_no_compiler_stack():
    """The first forward + backward in a fresh process imports neither torch._dynamo nor sympy
    (torch.library.custom_op's wrappers would: ~900 modules, ~2 s, ~150 MB)."""
    code = (
        "import sys, torch, pyalign\n"
        "before = set(sys.modules)\n"
        "x = torch.randn(2, 8, 100, requires_grad=True)\n"
        "pyalign.sequence_logprobs(x, torch.randint(0, 100, (2, 8))).sum().backward()\n"
        "new = set(sys.modules) - before\n"
        "print(len(new), sorted(m for m in new if m.startswith(('torch._dynamo', 'sympy', 'torch._inductor'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYALIGN_BACKEND": "", "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    count, heavy = done.stdout.strip().split(" ", 1)
    assert heavy == "[]" and int(count) < 20, done.stdout


def test_auto_on_cuda_is_one_table(monkeypatch):
    """"auto" on CUDA reads one table keyed by alignment and row count (bench.kernel_sweep
    prints the line its timings support); every key is there and names a GPU backend."""
    from pyalign.ops import backends

    assert set(backends.AUTO_CUDA) == {f"{a}/{r}" for a in ("aligned", "unaligned")
                                       for r in ("many_rows", "few_rows")}
    assert set(backends.AUTO_CUDA.values()) <= {"triton", "cuda"}
    monkeypatch.setattr(backends, "_multiprocessors", lambda index: 132)
    meta = torch.empty(8, 1024, 32000, device="meta")
    assert backends.cuda_logits_kind(meta) == "aligned/many_rows"
    assert backends.cuda_logits_kind(torch.empty(8, 1024, 50257, device="meta")) == "unaligned/many_rows"
    assert backends.cuda_logits_kind(meta[:, :-1]) == "aligned/many_rows"
    assert backends.cuda_logits_kind(meta[:1, :64]) == "aligned/few_rows"


def test_environment_variable_overrides_auto(monkeypatch):
    logits, labels = make_inputs((1, 2), 9, torch.float64)
    monkeypatch.setenv("PYALIGN_BACKEND", "torch")
    assert torch.equal(pyalign.token_logprobs(logits, labels), reference_token_logprobs(logits, labels))
    monkeypatch.setenv("PYALIGN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PYALIGN_BACKEND"):
        pyalign.token_logprobs(logits, labels)


def test_auto_runs_cpu_tensors_on_the_cpp_kernel():
    assert "cpu" in pyalign.available_backends("cpu"), "the C++ extension must be built for make test"
    from pyalign.ops.backends import resolve_backend
    assert resolve_backend("auto", torch.zeros(1, 2)).name == "cpu"


# ------------------------------------------------------------------------- bad input


def test_error_float_labels():
    with pytest.raises(ValueError, match="labels: expected an integer dtype"):
        pyalign.token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3))


def test_error_label_out_of_range():
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 5
    with pytest.raises(ValueError, match=r"labels: every label must be in \[0, 5\)"):
        pyalign.token_logprobs(torch.randn(2, 3, 5), labels)
    labels[1, 2] = -1
    with pytest.raises(ValueError, match="found -1"):
        pyalign.token_logprobs(torch.randn(2, 3, 5), labels)


def test_error_label_shape():
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 3\)"):
        pyalign.token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("bad, message", [
    (dict(ignore_index=True), "ignore_index: expected an int, got bool True"),
    (dict(ignore_index=-100.0), "ignore_index: expected an int, got float"),
    (dict(ignore_index=None), "ignore_index: expected an int, got NoneType"),
    (dict(ignore_index=torch.tensor(-100)), "ignore_index: expected an int, got Tensor"),
    (dict(inplace_backward=1), "inplace_backward: expected True or False, got int 1"),
    (dict(inplace_backward="yes"), "inplace_backward: expected True or False"),
    (dict(average=1), "average: expected True or False, got int 1"),
    (dict(average=None), "average: expected True or False, got NoneType"),
    (dict(average=torch.tensor(True)), "average: expected True or False, got Tensor"),
])
def test_error_argument_types(bad, message):
    """Options are of their exact type: True is not an ignore index, 1 or "yes" not a flag."""
    logits, labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        pyalign.sequence_logprobs(logits, labels, **bad)
    if "average" not in bad:
        with pytest.raises(ValueError, match=message):
            pyalign.token_logprobs(logits, labels, **bad)


def test_error_integer_logits_and_bad_backend():
    with pytest.raises(ValueError, match="logits: expected a floating dtype"):
        pyalign.token_logprobs(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend: expected one of"):
        pyalign.token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), backend="fast")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_error_gpu_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run on cpu tensors|cuda backend was not compiled"):
        try:
            pyalign.token_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), backend="cuda")
        except RuntimeError as err:  # not built here: BackendUnavailable is a RuntimeError
            raise ValueError(str(err)) from err


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for shape in [(0, 4), (2, 0)]:
        logits = torch.randn(*shape, 11, device=DEVICE, requires_grad=True)
        labels = torch.zeros(shape, dtype=torch.long, device=DEVICE)
        out = pyalign.token_logprobs(logits, labels, backend=backend)
        assert out.shape == shape
        seq = pyalign.sequence_logprobs(logits, labels, backend=backend, average=True)
        seq.sum().backward()
        assert logits.grad.shape == logits.shape and torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="V == 0"):
        pyalign.token_logprobs(torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long))
