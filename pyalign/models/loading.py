"""Loading causal LMs and tokenizers from local folders: one dtype table, one loader for training (on
a device, quiet on every process but the first) and one for inference (eval mode, pad token set).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pyalign import distributed

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32"):
    """Load a causal LM and its tokenizer from a local folder, in eval mode. A tokenizer without
    a pad token gets its EOS token as pad token (generation and batching need one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path must be a model folder with a config.json, got {str(path)!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    model.eval()
    return model, tokenizer


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if not distributed.is_main():  # one "Loading weights" bar per run, not one per process
        from transformers.utils import logging as transformers_logging  # noqa: PLC0415

        transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    return model.to(device)
