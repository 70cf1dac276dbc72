"""The Triton kernels (kernels/token_logprobs.py) against a float64 reference, at the backend
contract level (docs/DESIGN.md): triton_forward / triton_backward on [B, T, V] views.

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 (slow: shapes stay tiny); with
CUDA the same tests run on the GPU, plus the `large` ones (N * V > 2**31).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel module: triton decides at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

try:
    from pyalign.kernels import token_logprobs as tk
except ImportError:  # not installed yet: import the source folder directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels.token_logprobs as tk

from pyalign.reference import reference_token_logprobs, row_normaliser

if tk._INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (logit_scale, softcap): Cohere/Granite-like scales, Gemma-like soft-caps, both at once.
TRANSFORMS = [(0.0625, None), (2.5, None), (1.0, 30.0), (1.7, 5.0)]
# Gradient tolerance: the kernel rounds once to the logits dtype, so one unit in the last place.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _make_case(B, T, V, dtype, seed, ignored_fraction=0.3):
    """Logits as the usual non-contiguous `logits[:, :-1]` view, labels with ignored positions
    and the last sequence fully ignored, and an upstream gradient of both signs."""
    gen = _generator(seed)
    full = (torch.randn(B, T + 1, V, generator=gen, device=DEVICE) * 3).to(dtype)
    logits3 = full[:, :-1]
    labels2 = torch.randint(0, V, (B, T), generator=gen, device=DEVICE)
    ignored = torch.rand(B, T, generator=gen, device=DEVICE) < ignored_fraction
    ignored[-1] = True
    labels2[ignored] = IGNORE
    grad2 = torch.randn(B, T, generator=gen, device=DEVICE)
    return full, logits3, labels2, grad2


def _reference(logits3, labels2, grad2, logit_scale=1.0, softcap=None):
    """float64 logp, norm (each row's max and log-sum) and d(sum grad2 * logp)/d logits from the
    same (rounded) logits; exact at any offset (the reference subtracts the row maximum first)."""
    x = logits3.detach().double().requires_grad_(True)
    logp = reference_token_logprobs(x, labels2, IGNORE, logit_scale=logit_scale, softcap=softcap)
    (logp * grad2.double()).sum().backward()
    return logp.detach(), row_normaliser(x.detach(), logit_scale, softcap), x.grad


def _check_case(logits3, labels2, grad2, check_norm=True, reference_logits3=None, logit_scale=1.0,
                softcap=None, **launch):
    """Forward and backward against float64; `reference_logits3` (default: logits3) is what the
    reference sees, so that ignored rows may hold values no reference could digest. norm is
    compared on kept rows only: the contract leaves it unspecified on ignored rows."""
    logp, norm = tk._launch_forward(logits3, labels2, IGNORE, logit_scale, softcap, **launch)
    assert logp.dtype == norm.dtype == torch.float32
    assert logp.is_contiguous() and norm.is_contiguous() and norm.shape == (*labels2.shape, 2)
    if reference_logits3 is None:
        reference_logits3 = logits3
    ref_logp, ref_norm, ref_grad = _reference(reference_logits3, labels2, grad2, logit_scale, softcap)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=5e-5)
    kept = labels2 != IGNORE
    if check_norm:
        torch.testing.assert_close(norm.double()[kept], ref_norm[kept], rtol=1e-5, atol=5e-5)
    assert torch.all(logp[~kept] == 0)

    grad_out = torch.full_like(logits3, float("nan"))  # poison: every element must be written
    tk._launch_backward(logits3, labels2, norm, grad2, IGNORE, grad_out, logit_scale, softcap, **launch)
    assert not grad_out.isnan().any()
    assert torch.all(grad_out[labels2 == IGNORE] == 0)
    torch.testing.assert_close(grad_out.double(), ref_grad,
                               rtol=GRAD_RTOL[logits3.dtype], atol=1e-7)
    return logp, norm, grad_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
def test_matches_float64_reference(V, dtype):
    _, logits3, labels2, grad2 = _make_case(3, 5, V, dtype, seed=V)
    _check_case(logits3, labels2, grad2)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [7, 1000])
def test_transforms_match_float64_reference(V, dtype, transform):
    """logit_scale / softcap applied inside the kernels, forward and backward (through tanh),
    one program per row and split rows with their merge."""
    _, logits3, labels2, grad2 = _make_case(3, 4, V, dtype, seed=V + 5)
    logits3 = (logits3.float() * 2).to(dtype)  # |x| up to ~25: the tanh saturates on some
    for num_splits in (1, 3):
        _check_case(logits3, labels2, grad2, logit_scale=transform[0], softcap=transform[1],
                    num_splits=num_splits, block_v=128)


@pytest.mark.parametrize("transform", [(1.0, None), *TRANSFORMS], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_offsets_are_exact(dtype, transform):
    """Rows offset by 1e3 ... 1e30 (and -1e30), and rows with one huge logit among ordinary ones,
    against the exact answer (float64 on the logits minus their row maximum), in one program per
    row and with the vocabulary split."""
    V = 600
    gen = _generator(17)
    base = torch.randn(9, V, generator=gen, device=DEVICE, dtype=torch.float64) * 3
    offsets = torch.tensor([0.0, 1e3, 1e5, 1e7, 1e16, 1e30, -1e30], dtype=torch.float64, device=DEVICE)
    rows = torch.cat([base[:7] + offsets.unsqueeze(1), base[7:]])
    rows[7, 450] = 1e30
    rows[8, 3] = 1e7
    logits3 = rows.to(dtype).view(3, 3, V)
    labels2 = torch.randint(0, V, (3, 3), generator=gen, device=DEVICE)
    labels2[2, 1] = 450
    grad2 = torch.randn(3, 3, generator=gen, device=DEVICE)
    for num_splits in (1, 4):
        logp, _, grad_out = _check_case(logits3, labels2, grad2, logit_scale=transform[0], softcap=transform[1],
                                        num_splits=num_splits, block_v=64)
        assert torch.isfinite(logp).all() and torch.isfinite(grad_out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [50257, 128256])
def test_large_vocabulary_few_rows(V, dtype):
    _, logits3, labels2, grad2 = _make_case(2, 2, V, dtype, seed=V, ignored_fraction=0.0)
    _check_case(logits3, labels2, grad2)


@pytest.mark.parametrize("num_splits", [2, 3, 300])
def test_vocabulary_splits_agree(num_splits):
    """The split-V path (partial max/sum per chunk, then a merge) equals the reference; 300 is
    clamped to the number of blocks, and 4099 leaves a 3-element last chunk."""
    _, logits3, labels2, grad2 = _make_case(2, 3, 4099, torch.float32, seed=num_splits)
    logits3 = logits3.clone()
    logits3[0, 1, 4096:] = 40.0  # the row's maximum sits in the short last chunk
    _check_case(logits3, labels2, grad2, num_splits=num_splits)


@pytest.mark.parametrize("block_v", [16, 128])
def test_many_blocks_per_row(block_v):
    """Small blocks: the per-lane running max/sum carries over 63 (8) iterations, the row's
    maximum moves late in the row, and -inf entries sit in between."""
    _, logits3, labels2, grad2 = _make_case(2, 3, 1000, torch.float32, seed=block_v)
    logits3 = logits3.clone()
    logits3[0, 0, 990] = 25.0
    logits3[1, 1, 100:300] = float("-inf")
    labels2[1, 1] = 5
    _check_case(logits3, labels2, grad2, block_v=block_v, num_warps=1)
    _check_case(logits3, labels2, grad2, block_v=block_v, num_warps=1, num_splits=3)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("softcap", [None, 10.0], ids=["plain", "softcap"])
def test_ignored_rows_are_not_read(num_splits, poison, softcap):
    """Every ignored row is poisoned with NaN or inf, which any read would carry into that row's
    norm, its logp or its gradient (the reference sees the unpoisoned logits). The contract leaves
    norm unspecified there; these kernels write 0 without reading the row. Both the one-program
    path and the split-V path with its merge kernel."""
    _, clean, labels2, grad2 = _make_case(3, 4, 1000, torch.float32, seed=21, ignored_fraction=0.4)
    ignored = labels2 == IGNORE
    assert ignored.any() and (~ignored).any()
    poisoned = clean.clone()
    poisoned[ignored] = poison
    logp, norm, grad_out = _check_case(poisoned, labels2, grad2, reference_logits3=clean,
                                       num_splits=num_splits, block_v=256, num_warps=1, softcap=softcap)
    assert torch.all(logp[ignored] == 0) and torch.all(norm[ignored] == 0)
    assert torch.isfinite(norm[~ignored]).all() and torch.isfinite(logp[~ignored]).all()
    assert torch.all(grad_out[ignored] == 0) and torch.isfinite(grad_out).all()


def _layout(V, dtype, kind, seed):
    """Logits [2, 3, V] whose rows start off 16-byte boundaries in different ways."""
    gen = _generator(seed)
    if kind == "shift_left":   # logits[:, :-1]: row starts b*(T+1)*V + t*V
        full = (torch.randn(2, 4, V, generator=gen, device=DEVICE) * 3).to(dtype)
        return full[:, :-1]
    if kind == "shift_right":  # logits[:, 1:]: the first row starts at element V
        full = (torch.randn(2, 4, V, generator=gen, device=DEVICE) * 3).to(dtype)
        return full[:, 1:]
    # vocab slice: a resized vocabulary, every row one element off (storage offset 1)
    full = (torch.randn(2, 3, V + 1, generator=gen, device=DEVICE) * 3).to(dtype)
    return full[..., 1:]


@pytest.mark.parametrize("V", [50257, 32001])
@pytest.mark.parametrize("kind", ["shift_left", "shift_right", "vocab_slice"])
def test_unaligned_rows(V, kind):
    """V not a multiple of the vector width and rows starting anywhere: a scalar head and tail
    around an aligned body, forward and backward (out of place into a buffer of another phase,
    and in place), one program per row and split rows."""
    dtype = torch.bfloat16 if kind != "shift_right" else torch.float32
    logits3 = _layout(V, dtype, kind, seed=V % 97)
    assert not tk._fully_aligned(logits3)
    labels2 = torch.randint(0, V, (2, 3), generator=_generator(1), device=DEVICE)
    labels2[0, 0], labels2[0, 1], labels2[1, 2] = 0, V - 1, IGNORE  # both ends of the row
    grad2 = torch.randn(2, 3, generator=_generator(2), device=DEVICE)
    for num_splits in ((1, 5) if kind == "shift_left" else (1,)):
        _, norm, grad_out = _check_case(logits3, labels2, grad2, num_splits=num_splits)
    in_place = logits3.clone() if kind != "vocab_slice" else logits3
    tk.triton_backward(in_place, labels2, norm, grad2, IGNORE, in_place)
    torch.testing.assert_close(in_place, grad_out, rtol=0, atol=0)


def test_labels_outside_the_vocabulary_give_nan_rows():
    """Without the host check (GPU tensors), a label outside [0, V) reads nothing and gives that
    row a NaN log-prob and a NaN gradient; the other rows are unaffected."""
    _, logits3, labels2, grad2 = _make_case(2, 3, 50, torch.float32, seed=31, ignored_fraction=0.0)
    labels2[0, 1], labels2[1, 0] = 50, -7
    bad = torch.zeros_like(labels2, dtype=torch.bool)
    bad[0, 1] = bad[1, 0] = True
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    assert logp[bad].isnan().all() and not logp[~bad].isnan().any()
    grad_out = torch.zeros_like(logits3)
    tk.triton_backward(logits3, labels2, norm, grad2, IGNORE, grad_out)
    assert grad_out[bad].isnan().all() and not grad_out[~bad].isnan().any()
    good = labels2.masked_fill(bad, IGNORE)
    ref_logp, _, _ = _reference(logits3, good, grad2)
    torch.testing.assert_close(logp[~bad].double(), ref_logp[~bad], rtol=1e-5, atol=5e-5)


def test_overlapping_gradient_buffers_are_rejected():
    """One gradient element per logit: an expanded output (stride 0) or one that partly
    overlaps the logits would be written twice or read after being written."""
    logits3 = torch.randn(2, 3, 40, device=DEVICE)
    labels2 = torch.randint(0, 40, (2, 3), device=DEVICE)
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    expanded = torch.empty(1, 3, 40, device=DEVICE).expand(2, 3, 40)
    with pytest.raises(ValueError, match="grad_out3 must not have elements that share memory"):
        tk.triton_backward(logits3, labels2, norm, logp, IGNORE, expanded)
    storage = torch.randn(2, 4, 40, device=DEVICE)
    with pytest.raises(ValueError, match="partially overlapping"):
        tk.triton_backward(storage[:, :3], labels2, norm, logp, IGNORE, storage[:, 1:])


def test_chunk_len_is_a_block_multiple_covering_v():
    for V in (1, 7, 4096, 4099, 50257, 152064):
        block_v, _ = tk._block_v_and_warps(V)
        for wanted in (1, 2, 7, 64, 10**6):
            chunk_len, splits = tk._chunk_len(V, wanted, block_v)
            assert chunk_len % block_v == 0
            assert splits >= 1 and (splits - 1) * chunk_len < V <= splits * chunk_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_only_the_view(dtype):
    full, logits3, labels2, grad2 = _make_case(2, 6, 1000, dtype, seed=11)
    expected_logp, norm, expected_grad = _check_case(logits3, labels2, grad2)
    untouched = full[:, -1].clone()  # the position that `logits[:, :-1]` drops
    tk.triton_backward(logits3, labels2, norm, grad2, IGNORE, logits3)
    assert torch.equal(logits3, expected_grad)  # same bits as the out-of-place backward
    assert torch.equal(full[:, -1], untouched)


# The all -inf row computes log(0) and -inf - (-inf) on purpose; numpy (the interpreter) warns.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_minus_infinity_logits():
    """Masked vocabulary entries (-inf) contribute nothing (soft-capped, they are -softcap and
    count, as in the model's own logits); a row of -inf has a log-sum of -inf and a NaN log-prob,
    as torch's log_softmax gives."""
    _, logits3, labels2, grad2 = _make_case(2, 3, 1000, torch.float32, seed=5)
    logits3 = logits3.clone()
    logits3[..., 500:] = float("-inf")
    labels2 = labels2.clamp(max=499)  # ignored labels (-100) stay ignored
    _check_case(logits3, labels2, grad2)
    _check_case(logits3, labels2, grad2, softcap=8.0)
    logits3[0, 0] = float("-inf")
    labels2[0, 0] = 3
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    assert norm[0, 0, 1] == float("-inf") and logp[0, 0].isnan()


def test_finfo_min_row():
    """A row filled with the float32 minimum (a common mask value) keeps a finite normaliser."""
    logits3 = torch.full((1, 1, 10), torch.finfo(torch.float32).min, device=DEVICE)
    labels2 = torch.tensor([[3]], device=DEVICE)
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    assert torch.isfinite(norm).all()
    torch.testing.assert_close(logp, torch.full_like(logp, -torch.log(torch.tensor(10.0)).item()))


def test_other_ignore_index():
    logits3 = torch.randn(2, 4, 7, generator=_generator(3), device=DEVICE)
    labels2 = torch.randint(1, 7, (2, 4), generator=_generator(4), device=DEVICE)
    labels2[0, 1] = 0  # ignore_index = 0: label 0 is ignored, the rest are not
    logp, _ = tk.triton_forward(logits3, labels2, 0)
    expected = reference_token_logprobs(logits3.double(), labels2, 0)
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=5e-5)


def test_empty_inputs():
    for shape in [(0, 4, 10), (2, 0, 10)]:
        logits3 = torch.randn(shape, device=DEVICE)
        labels2 = torch.zeros(shape[:2], dtype=torch.int64, device=DEVICE)
        logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
        assert logp.shape == shape[:2] and norm.shape == (*shape[:2], 2)
        tk.triton_backward(logits3, labels2, norm, logp, IGNORE, torch.empty_like(logits3))
    logits3 = torch.randn(2, 3, 0, device=DEVICE)  # V == 0: every label must be ignored
    labels2 = torch.full((2, 3), IGNORE, device=DEVICE)
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    assert torch.all(logp == 0) and torch.all(norm == float("-inf"))


def _huge_stride_view(dim, dtype=torch.float16, V=1000):
    """A [1, 3, V] or [3, 1, V] view whose row starts reach 2 * (2**30 + 64) > 2**31 elements.

    Both the stride and the row index fit in int32, so only an int64 product is right (the
    interpreter reproduces int32 wrap-around). The 4 GiB buffer is allocated but only the three
    rows are touched, so the pages behind the rest are never committed.
    """
    stride = 2**30 + 64
    base = torch.empty(2 * stride + V, dtype=dtype, device=DEVICE)
    shape, strides = ([1, 3, V], [3 * stride, stride, 1]) if dim == 1 else \
        ([3, 1, V], [stride, V, 1])
    view = base.as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=_generator(dim), device=DEVICE).to(dtype))
    return base, view


@pytest.mark.parametrize("dim", [0, 1], ids=["batch_stride", "time_stride"])
def test_row_offsets_beyond_int32(dim):
    base, logits3 = _huge_stride_view(dim)
    B, T, V = logits3.shape
    labels2 = torch.tensor([7, IGNORE, V - 1], device=DEVICE).reshape(B, T)
    grad2 = torch.randn(B, T, generator=_generator(0), device=DEVICE)
    _check_case(logits3, labels2, grad2)
    del base


def test_contract_violations_raise():
    logits3 = torch.randn(2, 3, 8, device=DEVICE)
    labels2 = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="logits3"):
        tk.triton_forward(logits3[0], labels2, IGNORE)
    with pytest.raises(ValueError, match="logits3"):
        tk.triton_forward(logits3.double(), labels2, IGNORE)
    with pytest.raises(ValueError, match="stride"):
        tk.triton_forward(logits3.transpose(1, 2), labels2[:, :1].expand(2, 8).contiguous(), IGNORE)
    with pytest.raises(ValueError, match="labels2"):
        tk.triton_forward(logits3, labels2.int(), IGNORE)
    with pytest.raises(ValueError, match="labels2"):
        tk.triton_forward(logits3, labels2[:, :2], IGNORE)
    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    with pytest.raises(ValueError, match="grad_out3"):
        tk.triton_backward(logits3, labels2, norm, logp, IGNORE, torch.empty_like(logits3).half())
    with pytest.raises(ValueError, match="norm2"):
        tk.triton_backward(logits3, labels2, norm.double(), logp, IGNORE, logits3)
    with pytest.raises(ValueError, match="norm2"):
        tk.triton_backward(logits3, labels2, norm[..., 0].contiguous(), logp, IGNORE, logits3)
    with pytest.raises(ValueError, match="grad2"):
        tk.triton_backward(logits3, labels2, norm, logp.t(), IGNORE, logits3)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logit_scale"):
            tk.triton_forward(logits3, labels2, IGNORE, bad)
        with pytest.raises(ValueError, match="softcap"):
            tk.triton_backward(logits3, labels2, norm, logp, IGNORE, logits3.clone(), 1.0, bad)
    other = torch.device("cuda") if DEVICE.type == "cpu" and torch.cuda.is_available() else \
        torch.device("cpu") if DEVICE.type == "cuda" else None
    if other is not None:
        with pytest.raises(ValueError, match="logits3"):
            tk.triton_forward(logits3.to(other), labels2.to(other), IGNORE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_medium_shape_all_rows(dtype):
    """A training-sized batch: every row checked; the default heuristics (no splits) run."""
    _, logits3, labels2, grad2 = _make_case(4, 512, 32000, dtype, seed=1)
    _check_case(logits3, labels2, grad2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.large
def test_gpu_8x4096x152064_bf16_inplace():
    """N * V = 4.98e9 > 2**31 with contiguous logits: sampled rows (the last ones included)
    against float64, every ignored row's gradient exactly zero, in-place backward."""
    B, T, V = 8, 4096, 152064
    gen = _generator(0)
    logits3 = torch.randn(B, T, V, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    labels2 = torch.randint(0, V, (B, T), generator=gen, device=DEVICE)
    labels2[:, : T // 4] = IGNORE
    labels2[3] = IGNORE  # a fully ignored sequence
    grad2 = torch.randn(B, T, generator=gen, device=DEVICE)
    picks = torch.cat([torch.randint(0, B * T, (61,), generator=gen, device=DEVICE),
                       torch.tensor([B * T - 1, B * T - 2, 3 * T, T - 1], device=DEVICE)])
    b, t = picks // T, picks % T
    sample = logits3[b, t].unsqueeze(0).clone()
    sample_labels, sample_grad = labels2[b, t].unsqueeze(0), grad2[b, t].unsqueeze(0)

    logp, norm = tk.triton_forward(logits3, labels2, IGNORE)
    tk.triton_backward(logits3, labels2, norm, grad2, IGNORE, logits3)  # logits3 now holds grad
    ref_logp, ref_norm, ref_grad = _reference(sample, sample_labels, sample_grad)
    kept = sample_labels[0] != IGNORE  # norm is unspecified on ignored rows
    torch.testing.assert_close(logp[b, t].double(), ref_logp[0], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(norm[b, t].double()[kept], ref_norm[0][kept], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(logits3[b, t].double(), ref_grad[0], rtol=1e-2, atol=1e-7)
    for row in range(B):  # row by row: no logits-sized temporary
        assert not logits3[row][labels2[row] == IGNORE].any()


# Compiles the kernels for sm_90 (Hopper) without a GPU: triton ships ptxas and cuobjdump, and
# only the launch needs a device. The interpreter accepts code that the compiler rejects
# (non-constexpr globals, type errors in untaken branches), so this is the CPU's guard that the
# GPU build still works; it also reads the machine code (SASS): 16-byte loads, the pipelined
# loop, the flush-to-zero exp2, registers and spills. A fresh process: a module decorated under
# TRITON_INTERPRET=1 cannot be compiled. bench/NOTES_triton.md records what it shows.
_COMPILE_FOR_SM90 = r"""
import json, re, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
try:
    from pyalign.kernels import token_logprobs as tk
except ImportError:
    import kernels.token_logprobs as tk
CUOBJDUMP = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
POINTERS = {"logits_ptr", "labels_ptr", "logp_ptr", "norm_ptr", "part_max_ptr", "part_sum_ptr",
            "grad_ptr", "grad_out_ptr", "entropy_ptr", "mean_ptr", "lss_ptr", "argmax_ptr"}
# what the launcher's tensors give triton's specialization: aligned rows make every integer that
# locates a row divisible by 16; unaligned rows (V = 50257) only the storage base and chunk_len
ALIGNED_INTS = {"V", "stride_b", "stride_t", "out_stride_b", "out_stride_t", "chunk_len",
                "base_offset", "in_base", "out_base", "stride_row"}

def sass_counts(fn, sig, constexprs, num_warps, aligned):
    divisible = POINTERS | (ALIGNED_INTS if aligned else {"chunk_len"})
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in divisible}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    except TypeError as err:  # the ahead-of-time API is internal and moves between versions
        print(json.dumps({"skip": f"triton {triton.__version__}: {err}"}))
        sys.exit(0)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    out = {"ptx_ldg_v4": len(re.findall(r"ld[.]global[.]v4", compiled.asm["ptx"]))}
    cubin = Path(sys.argv[2]) / f"{fn.__name__}_{len(sys.argv)}_{hash(json.dumps(constexprs, sort_keys=True)) & 0xffff}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    if not CUOBJDUMP.exists():
        return out
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    loop = sass[sass.index("DEPBAR.LE SB0"):] if "DEPBAR.LE SB0" in sass else ""
    out.update({
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "local_memory": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "ldgsts_128": len(re.findall(r"LDGSTS[.]E[.]BYPASS[.]128", sass)),
        "ldgsts_128_in_loop": len(re.findall(r"LDGSTS[.]E[.]BYPASS[.]128", loop)),
        "ldg_128": len(re.findall(r"LDG[.]E[.]128", sass)),
        "ldg_scalar": len(re.findall(r"LDG[.]E(?:[.]U16)?\s", sass)),  # 2- or 4-byte loads
        "stg_128": len(re.findall(r"STG[.]E[.]128", sass)),
        "wait_leaves_one_in_flight": "DEPBAR.LE SB0, 0x1" in sass,
        "mufu_ex2": len(re.findall(r"MUFU[.]EX2", sass)),
        "ex2_denormal_fixups": len(re.findall(r"FSETP[.]GEU[.]AND P\d, PT, R\d+, -126", sass)),
    })
    return out

def counts(dt, aligned, softcap):
    vec = 16 // (2 if dt in ("bf16", "fp16") else 4)
    rows = dict(T="i32", V="i32", stride_b="i32", stride_t="i32")
    transform = dict(a="fp32", cap_k="fp32", cap="fp32")
    fwd = dict(logits_ptr="*" + dt, base_offset="i64", labels_ptr="*i64", logp_ptr="*fp32",
               norm_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", **rows, chunk_len="i32",
               num_splits="i32", ignore_index="i32", **transform, BLOCK_V="constexpr", SPLIT="constexpr",
               VEC="constexpr", ALIGNED="constexpr", NUM_STAGES="constexpr", SOFTCAP="constexpr")
    merge = dict(logits_ptr="*" + dt, base_offset="i64", labels_ptr="*i64", logp_ptr="*fp32",
                 norm_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", **rows,
                 num_splits="i32", ignore_index="i32", **transform, BLOCK_SPLITS="constexpr",
                 SOFTCAP="constexpr")
    bwd = dict(logits_ptr="*" + dt, in_base="i64", labels_ptr="*i64", norm_ptr="*fp32", grad_ptr="*fp32",
               grad_out_ptr="*" + dt, out_base="i64", **rows, out_stride_b="i32", out_stride_t="i32",
               chunk_len="i32", ignore_index="i32", **transform, grad_scale="fp32", BLOCK_V="constexpr",
               VEC="constexpr", ALIGNED="constexpr", SAME_PHASE="constexpr", NUM_STAGES="constexpr",
               SOFTCAP="constexpr")
    common = {"BLOCK_V": 4096, "VEC": vec, "ALIGNED": aligned, "NUM_STAGES": tk.NUM_STAGES, "SOFTCAP": softcap}
    result = {
        "forward": sass_counts(tk._forward_kernel, fwd, {**common, "SPLIT": False}, 8, aligned),
        "backward": sass_counts(tk._backward_kernel, bwd, {**common, "SAME_PHASE": True}, 8, aligned),
    }
    if aligned:
        result["forward_split"] = sass_counts(tk._forward_kernel, fwd, {**common, "SPLIT": True}, 8, aligned)
        result["merge"] = sass_counts(tk._forward_merge_kernel, merge, {"BLOCK_SPLITS": 128, "SOFTCAP": softcap},
                                      1, aligned)
        from pyalign.kernels import token_stats
        stats = dict(logits_ptr="*" + dt, stride_row="i32", norm_ptr="*fp32", entropy_ptr="*fp32",
                     mean_ptr="*fp32", lss_ptr="*fp32", argmax_ptr="*i64", V="i32", **transform,
                     BLOCK_V="constexpr", SOFTCAP="constexpr")
        result["stats"] = sass_counts(token_stats._stats_kernel, stats, {"BLOCK_V": 4096, "SOFTCAP": softcap},
                                      8, aligned)
    return result

print(json.dumps({f"{dt}_{'aligned' if a else 'unaligned'}{'_softcap' if c else ''}": counts(dt, a, c)
                  for dt, a, c in (("bf16", True, False), ("bf16", False, False), ("fp32", True, False),
                                   ("bf16", True, True), ("bf16", False, True))}))
"""


def test_kernels_compile_for_hopper(tmp_path):
    """sm_90 machine code: 16-byte accesses in every body loop (aligned rows, and the aligned
    body of unaligned ones, V = 50257), the loop's loads pipelined (cp.async, LDGSTS: the loop
    waits for the oldest stage with DEPBAR.LE SB0, 0x1, so the next block's loads are in flight
    before the current block is used), exp2 with no denormal fix-ups (flush to zero), no spills;
    the soft-capped variants (one more exp2 and a division per element for the tanh) too."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90,
                           str(Path(__file__).resolve().parents[1]), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    by_variant = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in by_variant:
        pytest.skip(by_variant["skip"])
    for variant, kernels in by_variant.items():
        per_stage = 2 if variant.startswith("bf16") else 4  # 16 elements per thread, 16 B per load
        for name, counts in kernels.items():
            assert counts.get("local_memory", 0) == 0, (variant, name, "spills", counts)
            assert counts.get("ex2_denormal_fixups", 0) == 0, (variant, name, counts)
            if name in ("merge", "stats") or "ldgsts_128" not in counts:
                continue
            # NUM_STAGES - 1 stages issued before the loop, one more per iteration
            assert counts["ldgsts_128"] == tk.NUM_STAGES * per_stage, (variant, name, counts)
            assert counts["ldgsts_128_in_loop"] == per_stage, (variant, name, counts)
            assert counts["wait_leaves_one_in_flight"], (variant, name, counts)
            assert counts["mufu_ex2"] > 0
        if "stg_128" in kernels["backward"]:
            assert kernels["backward"]["stg_128"] == per_stage, (variant, kernels["backward"])
    print(json.dumps(by_variant, indent=1))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [1000, 4099])
def test_token_stats_kernel(V, dtype):
    """The fused lm_head's statistics kernel against the float64 reference on the same logits:
    entropy, mean logit, log sum p^2 and the first argmax (a tie planted before the maximum's
    other occurrence), -inf entries included."""
    from pyalign.kernels.token_stats import triton_token_stats
    from pyalign.reference import reference_token_stats

    logits = (torch.randn(7, V, generator=_generator(V), device=DEVICE) * 3).to(dtype)
    logits[1, 10:200] = float("-inf")
    logits[2, 7] = logits[2, V - 5] = 30.0  # tie: the first index wins
    logits[6] += 1e7  # a large offset: the normaliser keeps it exact
    labels = torch.randint(0, V, (7,), generator=_generator(1), device=DEVICE)
    for transform in [(1.0, None), *TRANSFORMS]:
        _, norm = tk.triton_forward(logits.unsqueeze(0), labels.unsqueeze(0), IGNORE, *transform)
        entropy, mean, lss, argmax = triton_token_stats(logits, norm[0], *transform)
        ref = reference_token_stats(logits, labels, logit_scale=transform[0], softcap=transform[1])
        torch.testing.assert_close(entropy.double(), ref["entropy"].double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mean.double(), ref["mean_logits"].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lss.double(), ref["log_sum_sq_probs"].double(), rtol=1e-4, atol=1e-4)
        assert torch.equal(argmax, ref["argmax"]) and argmax[2] == 7
