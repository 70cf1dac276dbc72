"""Where a model runs and in which precision: the device a config names, and bf16 autocast."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} requested but CUDA is not available")
    return device


def uses_autocast(device: torch.device, mixed_precision: str) -> bool:
    """bf16 autocast on CUDA for ``auto``/``bf16``; on CPU only when ``bf16`` is asked for."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, mixed_precision: str):
    if not uses_autocast(device, mixed_precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
