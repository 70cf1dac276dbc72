"""The CUDA kernels: a build check with nvcc wherever it exists (no GPU needed), a syntax check of
the binding against torch's headers, and, on a CUDA machine whose pyalign._C was built with CUDA,
the "cuda" backend against the float64 reference: plain, with the logit transforms (logit_scale,
softcap), and at extreme offsets (exact answers in float64 on the logits minus their row maximum).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from pyalign.reference import reference_token_logprobs, row_normaliser

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


def test_binding_compiles_against_torch_headers(tmp_path):
    """csrc/cuda/binding.cpp (the tensor layer of the cuda backend) is only built with a CUDA
    torch: a syntax check here with the CPU wheel's headers, the CUDA toolkit's, and an empty
    stand-in for the one generated header a CPU wheel lacks."""
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
             str(Path(shutil.which("nvcc") or "/nonexistent").resolve().parents[1])]
    found = [Path(home) / "include" for home in homes if home and (Path(home) / "include" / "cuda_runtime.h").exists()]
    if shutil.which("g++") is None or not found:
        pytest.skip("needs g++ and the CUDA toolkit's headers")
    cuda_include = found[0]
    torch_include = Path(torch.__file__).parent / "include"
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    command = ["g++", "-std=c++20", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-DPYALIGN_WITH_CUDA", f"-I{ROOT / 'csrc'}", f"-I{torch_include}",
               f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{tmp_path}", f"-I{cuda_include}",
               f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "cuda" / "binding.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"


def _cuda_backend_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _C = pytest.importorskip("pyalign._C", reason="the extension is not built")
    if not _C.has_cuda():
        pytest.skip("pyalign._C was built without CUDA (needs a CUDA torch and nvcc at build time)")
    return _C


def _reference(logits3, labels2, grad2, logit_scale=1.0, softcap=None):
    """logp (float32) and d(sum(grad2 * logp))/dlogits (float64) by autograd on float64 math."""
    x = logits3.detach().double().requires_grad_(True)
    logp = reference_token_logprobs(x, labels2, IGNORE, logit_scale=logit_scale, softcap=softcap)
    (logp * grad2.double()).sum().backward()
    return logp.float(), x.grad


GRAD_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=3e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def _check(_C, logits3, labels2, grad2, *, in_place=False, reference_logits3=None, logit_scale=1.0,
           softcap=None):
    """The cuda backend against float64; `reference_logits3` (default: logits3) is what the
    reference sees, so that ignored rows may hold values no reference could digest. norm (each
    row's maximum and log-sum) is compared on kept rows only: the contract leaves it unspecified
    on ignored rows."""
    if reference_logits3 is None:
        reference_logits3 = logits3
    want_logp, want_grad = _reference(reference_logits3, labels2, grad2, logit_scale, softcap)
    logp, norm = _C.cuda_forward(logits3, labels2, IGNORE, logit_scale, softcap)
    assert logp.dtype == norm.dtype == torch.float32 and logp.shape == labels2.shape
    assert norm.shape == (*labels2.shape, 2)
    torch.testing.assert_close(logp.double(), want_logp.double(), rtol=1e-6, atol=2e-5)
    kept = labels2 != IGNORE
    want_norm = row_normaliser(reference_logits3.double(), logit_scale, softcap)
    torch.testing.assert_close(norm.double()[kept], want_norm[kept], rtol=1e-6, atol=2e-5)
    scale = float(grad2.abs().max()) if grad2.numel() else 1.0
    tol = dict(GRAD_TOLERANCE[logits3.dtype])
    tol["atol"] *= scale * max(1.0, logit_scale)
    if in_place:
        _C.cuda_backward(logits3, labels2, norm, grad2, IGNORE, logits3, logit_scale, softcap)
        got = logits3
    else:
        got = torch.full_like(logits3, float("nan"))  # every element must be written
        _C.cuda_backward(logits3, labels2, norm, grad2, IGNORE, got, logit_scale, softcap)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.double(), want_grad, **tol)
    return logp, norm, got


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
@pytest.mark.parametrize("transform", [(0.0625, None), (4.0, None), (1.0, 30.0), (2.0, 3.0)], ids=str)
@pytest.mark.parametrize("vocab", [7, 4099, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_logit_transforms(dtype, vocab, transform):
    """logit_scale / softcap inside the kernels, forward and backward (through tanh), on strided
    rows (logits[:, :-1]), out of place and in place."""
    _C = _cuda_backend_or_skip()
    full, labels, grad = _case(2, 6, vocab, dtype, seed=vocab + 1, extra_time=1)
    full = (full.float() * 3).to(dtype)
    _check(_C, full[:, :-1], labels, grad, logit_scale=transform[0], softcap=transform[1])
    _check(_C, full[:, :-1].clone(), labels, grad, in_place=True, logit_scale=transform[0], softcap=transform[1])


@pytest.mark.gpu
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, None), (1.0, 30.0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_extreme_offsets_are_exact(dtype, transform):
    """Rows offset by 1e3 ... 1e30 and rows with one huge logit: the reference (exact: it
    subtracts the row maximum in float64 first) and the kernel agree to float32 rounding."""
    _C = _cuda_backend_or_skip()
    vocab = 5000
    gen = torch.Generator(device="cuda").manual_seed(8)
    base = torch.randn(9, vocab, device="cuda", generator=gen, dtype=torch.float64) * 3
    offsets = torch.tensor([0.0, 1e3, 1e5, 1e7, 1e16, 1e30, -1e30], device="cuda", dtype=torch.float64)
    rows = torch.cat([base[:7] + offsets.unsqueeze(1), base[7:]])
    rows[7, 2500] = 1e30
    rows[8, 3] = 1e7
    logits = rows.to(dtype).view(3, 3, vocab)
    labels = torch.randint(0, vocab, (3, 3), device="cuda", generator=gen)
    labels[2, 1] = 2500
    grad = torch.randn(3, 3, device="cuda", generator=gen)
    logp, _, got = _check(_C, logits, labels, grad, logit_scale=transform[0], softcap=transform[1])
    assert torch.isfinite(logp).all() and torch.isfinite(got).all()


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
    _check(_C, logits, labels, grad, softcap=10.0)  # a soft-capped -inf is -softcap: it counts
    logp, norm = _C.cuda_forward(logits, labels, IGNORE)
    out = torch.full_like(logits, float("nan"))
    _C.cuda_backward(logits, labels, norm, grad, IGNORE, out)
    assert torch.all(logp[1] == 0) and torch.all(out[1] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [7, 4099, 50257])  # 32, 64 and 512 threads per row
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cuda_ignored_rows_are_not_read(poison, vocab):
    """Every ignored row is poisoned with NaN or inf, which any read would carry into that row's
    norm, its logp or its gradient (the reference sees the unpoisoned logits). The contract leaves
    norm unspecified there; the kernel writes 0 without reading the row (its block exits early,
    skipping the reduction's barriers). Ignored and kept rows alternate."""
    _C = _cuda_backend_or_skip()
    clean, labels, grad = _case(3, 6, vocab, torch.bfloat16, seed=5)
    labels[:, 1::2] = IGNORE
    labels[2] = IGNORE  # a fully ignored sequence
    ignored = labels == IGNORE
    poisoned = clean.clone()
    poisoned[ignored] = poison
    logp, norm, grad_out = _check(_C, poisoned, labels, grad, reference_logits3=clean)
    assert torch.all(logp[ignored] == 0) and torch.all(norm[ignored] == 0)
    assert torch.isfinite(norm[~ignored]).all() and torch.isfinite(logp[~ignored]).all()
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

    logp, norm = _C.cuda_forward(logits, labels, IGNORE)
    _C.cuda_backward(logits, labels, norm, grad, IGNORE, logits)  # in place: no second 10 GB
    torch.cuda.synchronize()
    got_logp = torch.stack([logp[b, t] for b, t in picks]).unsqueeze(0)
    got_grad = torch.stack([logits[b, t] for b, t in picks]).unsqueeze(0)
    torch.testing.assert_close(got_logp.double(), want_logp.double(), rtol=1e-6, atol=2e-5)
    tol = dict(GRAD_TOLERANCE[dtype])
    tol["atol"] *= float(row_grad.abs().max())
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)
    assert torch.all(logits[:, : seq // 4] == 0)  # ignored rows were zeroed everywhere
