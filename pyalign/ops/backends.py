"""Backend registry for the fused token log-prob op.

Each backend is a pair of functions following the contract in docs/DESIGN.md:
``forward(logits3, labels2, ignore_index) -> (logp2, lse2)`` and
``backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3) -> None``.
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


@functools.cache
def _auto_backend(device_type: str) -> str:
    if device_type == "cuda":
        # Triton first: it matches the CUDA C++ kernel on Hopper and needs no compiled extension.
        for name in ("triton", "cuda"):
            if _available(name):
                return name
        return "torch"
    if device_type == "cpu" and _available("cpu"):
        return "cpu"
    return "torch"


def resolve_backend(backend: str, logits: torch.Tensor) -> Backend:
    """Pick the backend for ``logits`` and check that it can run them, with a clear error."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _auto_backend(logits.device.type)
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
