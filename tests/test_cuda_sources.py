"""The CUDA kernels: a build check with nvcc wherever it exists (no GPU needed), and, on a CUDA
machine whose pyalign._C was built with CUDA, the "cuda" backend against the float64 reference.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pyalign.reference import reference_token_logprobs

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCE = ROOT / "csrc" / "cuda" / "token_logprobs.cu"
IGNORE = -100


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_compile_with_nvcc_without_torch_headers(tmp_path):
    # Only the CUDA toolkit's headers are visible: the .cu must not need torch.
    command = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", str(CUDA_SOURCE),
               "-o", str(tmp_path / "token_logprobs.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    assert (tmp_path / "token_logprobs.o").stat().st_size > 0


def _cuda_backend_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _C = pytest.importorskip("pyalign._C", reason="the extension is not built")
    if not _C.has_cuda():
        pytest.skip("pyalign._C was built without CUDA (needs a CUDA torch and nvcc at build time)")
    return _C


def _reference(logits3, labels2, grad2):
    """logp (float32) and d(sum(grad2 * logp))/dlogits (float64) by autograd on float64 math."""
    x = logits3.detach().double().requires_grad_(True)
    logp = reference_token_logprobs(x, labels2, IGNORE)
    (logp * grad2.double()).sum().backward()
    return logp.float(), x.grad


GRAD_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=3e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def _check(_C, logits3, labels2, grad2, *, in_place=False, reference_logits3=None):
    """The cuda backend against float64; `reference_logits3` (default: logits3) is what the
    reference sees, so that ignored rows may hold values no reference could digest. lse is
    compared on kept rows only: the contract leaves it unspecified on ignored rows."""
    if reference_logits3 is None:
        reference_logits3 = logits3
    want_logp, want_grad = _reference(reference_logits3, labels2, grad2)
    logp, lse = _C.cuda_forward(logits3, labels2, IGNORE)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == labels2.shape
    torch.testing.assert_close(logp.double(), want_logp.double(), rtol=1e-6, atol=2e-5)
    kept = labels2 != IGNORE
    want_lse = torch.logsumexp(reference_logits3.double(), dim=-1)
    torch.testing.assert_close(lse.double()[kept], want_lse[kept], rtol=1e-6, atol=2e-5)
    scale = float(grad2.abs().max()) if grad2.numel() else 1.0
    tol = dict(GRAD_TOLERANCE[logits3.dtype])
    tol["atol"] *= scale
    if in_place:
        _C.cuda_backward(logits3, labels2, lse, grad2, IGNORE, logits3)
        got = logits3
    else:
        got = torch.full_like(logits3, float("nan"))  # every element must be written
        _C.cuda_backward(logits3, labels2, lse, grad2, IGNORE, got)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.double(), want_grad, **tol)
    return logp, lse, got


def _case(batch, seq, vocab, dtype, seed, extra_time=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(batch, seq + extra_time, vocab, device="cuda", generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    labels[:, : max(1, seq // 4)] = IGNORE
    grad = torch.randn(batch, seq, device="cuda", generator=gen)
    return logits, labels, grad


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099, 32000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_reference(dtype, vocab):
    _C = _cuda_backend_or_skip()
    logits, labels, grad = _case(2, 8 if vocab < 100000 else 2, vocab, dtype, seed=vocab)
    _check(_C, logits, labels, grad)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [4099, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_strided_rows_and_in_place(dtype, vocab):
    """logits[:, :-1] with odd V: rows start at every 16-byte offset, and the fresh gradient's
    rows are aligned differently from the logits' rows (the elementwise-store path)."""
    _C = _cuda_backend_or_skip()
    full, labels, grad = _case(3, 7, vocab, dtype, seed=1, extra_time=1)
    _check(_C, full[:, :-1], labels, grad)
    full, labels, grad = _case(3, 7, vocab, dtype, seed=2, extra_time=1)
    last = full[:, -1].clone()
    _check(_C, full[:, :-1], labels, grad, in_place=True)
    assert torch.equal(full[:, -1], last)  # the row outside the view is untouched


@pytest.mark.gpu
def test_cuda_fully_ignored_rows_and_special_values():
    _C = _cuda_backend_or_skip()
    logits, labels, grad = _case(2, 4, 5000, torch.float32, seed=3)
    labels[1] = IGNORE
    logits[0, 1, :2000] = float("-inf")  # masked vocabulary
    labels[0, 1] = 3000
    logits[0, 2, 4321] = 80.0  # a late, large maximum
    _check(_C, logits, labels, grad)
    logp, lse = _C.cuda_forward(logits, labels, IGNORE)
    out = torch.full_like(logits, float("nan"))
    _C.cuda_backward(logits, labels, lse, grad, IGNORE, out)
    assert torch.all(logp[1] == 0) and torch.all(out[1] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [7, 4099, 50257])  # 32, 64 and 512 threads per row
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cuda_ignored_rows_are_not_read(poison, vocab):
    """Every ignored row is poisoned with NaN or inf, which any read would carry into that row's
    lse, its logp or its gradient (the reference sees the unpoisoned logits). The contract leaves
    lse unspecified there; the kernel writes 0 without reading the row (its block exits early,
    skipping the reduction's barriers). Ignored and kept rows alternate."""
    _C = _cuda_backend_or_skip()
    clean, labels, grad = _case(3, 6, vocab, torch.bfloat16, seed=5)
    labels[:, 1::2] = IGNORE
    labels[2] = IGNORE  # a fully ignored sequence
    ignored = labels == IGNORE
    poisoned = clean.clone()
    poisoned[ignored] = poison
    logp, lse, grad_out = _check(_C, poisoned, labels, grad, reference_logits3=clean)
    assert torch.all(logp[ignored] == 0) and torch.all(lse[ignored] == 0)
    assert torch.isfinite(lse[~ignored]).all() and torch.isfinite(logp[~ignored]).all()
    assert torch.all(grad_out[ignored] == 0) and torch.isfinite(grad_out).all()


@pytest.mark.gpu
@pytest.mark.large
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_cuda_offsets_beyond_2_pow_31(dtype):
    """8 x 4096 x 152064 (N * V = 5e9 > 2^31): rows at the end of the tensor are exact."""
    _C = _cuda_backend_or_skip()
    batch, seq, vocab = 8, 4096, 152064
    gen = torch.Generator(device="cuda").manual_seed(4)
    logits = torch.empty(batch, seq, vocab, device="cuda", dtype=dtype)
    logits.normal_(generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    labels[:, : seq // 4] = IGNORE
    grad = torch.randn(batch, seq, device="cuda", generator=gen)
    picks = [(0, seq // 4), (3, 1234), (batch - 1, seq - 2), (batch - 1, seq - 1)]
    rows = torch.stack([logits[b, t] for b, t in picks]).unsqueeze(0)  # copies, [1, 4, V]
    row_labels = torch.stack([labels[b, t] for b, t in picks]).unsqueeze(0)
    row_grad = torch.stack([grad[b, t] for b, t in picks]).unsqueeze(0)
    want_logp, want_grad = _reference(rows, row_labels, row_grad)

    logp, lse = _C.cuda_forward(logits, labels, IGNORE)
    _C.cuda_backward(logits, labels, lse, grad, IGNORE, logits)  # in place: no second 10 GB
    torch.cuda.synchronize()
    got_logp = torch.stack([logp[b, t] for b, t in picks]).unsqueeze(0)
    got_grad = torch.stack([logits[b, t] for b, t in picks]).unsqueeze(0)
    torch.testing.assert_close(got_logp.double(), want_logp.double(), rtol=1e-6, atol=2e-5)
    tol = dict(GRAD_TOLERANCE[dtype])
    tol["atol"] *= float(row_grad.abs().max())
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)
    assert torch.all(logits[:, : seq // 4] == 0)  # ignored rows were zeroed everywhere
