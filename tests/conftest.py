import os

import pytest
import torch

# Triton reads this when its kernels are defined, so it must be set before anything imports them.
# Without a GPU, the Triton kernels run (slowly) on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", help="run large-shape tests (GPU suite)")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: large shapes (N*V > 2^31); run with --run-large")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_large = pytest.mark.skip(reason="large shape: run with --run-large (make test-gpu)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
