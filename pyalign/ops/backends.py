"""Backend registry for the fused token log-prob op.

Each backend is a pair of functions following the contract in docs/DESIGN.md:
``forward(logits3, labels2, ignore_index, logit_scale=1.0, softcap=None) -> (logp2, norm2)`` and
``backward(logits3, labels2, norm2, grad2, ignore_index, grad_out3, logit_scale=1.0, softcap=None)
-> None``, ``norm2 [B, T, 2]`` holding each row's maximum and log-sum (pyalign/reference.py).
Implementations are imported lazily so that a missing optional piece (Triton, the CUDA build)
only matters when it is asked for.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from pyalign import reference

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
ENV_VAR = "PYALIGN_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly but cannot run here (not built, not installed)."""


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def native_module():
    """The compiled extension ``pyalign._C``, or raise with the way to build it."""
    try:
        from pyalign import _C  # noqa: PLC0415
    except ImportError as err:
        raise BackendUnavailable(
            "pyalign's C++ extension (pyalign._C) is not built: run `make build` or "
            "`pip install --no-build-isolation -e .` in the repository "
            f"(import error: {err})"
        ) from err
    return _C


def _triton_module():
    try:
        from pyalign.kernels import token_logprobs as triton_kernels  # noqa: PLC0415
    except ImportError as err:
        raise BackendUnavailable(f"the triton backend needs the `triton` package ({err})") from err
    return triton_kernels


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def get_backend(name: str) -> Backend:
    if name == "torch":
        return Backend("torch", reference.reference_forward, reference.reference_backward,
                       ("cpu", "cuda"), _FLOATS + (torch.float64,))
    if name == "cpu":
        native = native_module()
        return Backend("cpu", native.cpu_forward, native.cpu_backward, ("cpu",),
                       _FLOATS + (torch.float64,))
    if name == "cuda":
        native = native_module()
        if not native.has_cuda():
            raise BackendUnavailable(
                "the cuda backend was not compiled: pyalign._C was built without CUDA "
                "(it needs a CUDA build of torch and nvcc at build time)"
            )
        return Backend("cuda", native.cuda_forward, native.cuda_backward, ("cuda",), _FLOATS)
    if name == "triton":
        kernels = _triton_module()
        devices = ("cuda", "cpu") if triton_interpreter_enabled() else ("cuda",)
        return Backend("triton", kernels.triton_forward, kernels.triton_backward, devices, _FLOATS)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def _available(name: str) -> bool:
    try:
        get_backend(name)
    except BackendUnavailable:
        return False
    return True


def available_backends(device: str | torch.device) -> list[str]:
    """Names of the backends that can run on tensors of ``device`` in this installation."""
    device_type = torch.device(device).type
    names = []
    for name in BACKENDS[1:]:
        if _available(name) and device_type in get_backend(name).devices:
            names.append(name)
    return names


# "auto" on CUDA tensors, by the kind of logits: rows 16-byte aligned or not (V and the row
# strides multiples of 16 elements), and enough rows to fill the GPU without splitting the
# vocabulary (4 programs per multiprocessor) or not. THE ONE LINE a GPU session edits after
# `python -m bench.kernel_sweep` prints the line its timings support (bench/NOTES_triton.md).
# Not measured on a GPU yet: Triton everywhere (it needs no compiled extension).
AUTO_CUDA = {"aligned/many_rows": "triton", "aligned/few_rows": "triton", "unaligned/many_rows": "triton", "unaligned/few_rows": "triton"}  # noqa: E501


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).multi_processor_count


def cuda_kind(aligned: bool, rows: int, device: torch.device) -> str:
    """The key of :data:`AUTO_CUDA`: ``rows`` rows of logits on ``device``, 16-byte aligned or not."""
    many = rows >= 4 * _multiprocessors(device.index)
    return f"{'aligned' if aligned else 'unaligned'}/{'many_rows' if many else 'few_rows'}"


def cuda_logits_kind(logits: torch.Tensor) -> str:
    """The key of :data:`AUTO_CUDA` for these (CUDA) logits [..., V]."""
    if logits.dim() == 0:
        return cuda_kind(False, 1, logits.device)
    aligned = logits.shape[-1] % 16 == 0 and logits.data_ptr() % 16 == 0 and all(
        stride % 16 == 0 for stride, size in zip(logits.stride()[:-1], logits.shape[:-1]) if size > 1)
    return cuda_kind(aligned, logits.numel() // max(1, logits.shape[-1]), logits.device)


def _auto_backend(logits: torch.Tensor, kind: str | None = None) -> str:
    device_type = logits.device.type
    if device_type == "cuda":
        first = AUTO_CUDA[kind or cuda_logits_kind(logits)]
        for name in (first, "triton", "cuda"):
            if _available(name):
                return name
        return "torch"
    if device_type == "cpu" and _available("cpu"):
        return "cpu"
    return "torch"


def resolve_backend(backend: str, logits: torch.Tensor, kind: str | None = None) -> Backend:
    """Pick the backend for ``logits`` and check that it can run them, with a clear error.
    ``kind`` (a key of :data:`AUTO_CUDA`) describes the logits when ``logits`` is a stand-in
    (the fused lm_head resolves its backend from the hidden states)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _auto_backend(logits, kind)
    chosen = get_backend(backend)
    if logits.device.type not in chosen.devices:
        hint = (" (Triton runs CPU tensors only under TRITON_INTERPRET=1)"
                if backend == "triton" and logits.device.type == "cpu" else "")
        raise ValueError(
            f"backend: {backend!r} cannot run on {logits.device.type} tensors{hint}; "
            f"available here: {available_backends(logits.device)}"
        )
    if logits.dtype not in chosen.dtypes:
        raise ValueError(
            f"logits: backend {backend!r} supports dtypes {list(chosen.dtypes)}, got {logits.dtype}"
        )
    return chosen
