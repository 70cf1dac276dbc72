"""Which backends the public-op tests run, on which device, at which sizes."""

import importlib.util

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def backends_for_device() -> list[str]:
    """The float64 reference always; the C++ kernel on the CPU (it must be built for `make test`);
    Triton (on the GPU, or on small shapes under the interpreter) and CUDA on a GPU."""
    names = ["torch"]
    if ON_GPU:
        names += ["triton", "cuda"]
    else:
        names.append("cpu")
        if importlib.util.find_spec("triton") is not None:
            names.append("triton")
    return names


def is_interpreted(backend: str) -> bool:
    return backend == "triton" and not ON_GPU


# Tolerances for comparing a kernel against the float64 reference on the same inputs.
LOGP_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-5),
            torch.bfloat16: (2e-4, 1e-5), torch.float16: (2e-4, 1e-5)}
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-6, 1e-4),
            torch.bfloat16: (1e-3, 1.6e-2), torch.float16: (1e-4, 2e-3)}
