"""Checks of tensor layouts shared by the ops and the kernels (the C++ twin: csrc/tensor_checks.h).
"""

from __future__ import annotations

from torch import Tensor


def has_self_overlap(tensor: Tensor) -> bool:
    """Whether two elements of ``tensor`` might share memory (e.g. an expanded view, stride 0).

    Dimensions of size > 1 sorted by stride must each step over everything the smaller ones
    span; a layout that fails this is treated as overlapping (a few exotic interleaved layouts
    that do not overlap are flagged too, which only costs them the in-place backward)."""
    span = 0  # largest offset reachable with the dimensions seen so far
    for stride, size in sorted((abs(st), sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False
