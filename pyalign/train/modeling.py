"""Model plumbing for the trainer: loading, LoRA, merging, fingerprints, policy log-probs."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import Tensor

from pyalign import distributed
from pyalign.integrations.hf import causal_lm_sequence_logprobs
from pyalign.io import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


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


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if not distributed.is_main():  # one "Loading weights" bar per run, not one per process
        from transformers.utils import logging as transformers_logging  # noqa: PLC0415

        transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    return model.to(device)


def apply_lora(model, lora, *, seed: int, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` in a peft LoRA adapter (``lora``: a :class:`LoraConfig` section).
    ``seed`` fixes the adapter's random init. ``task_type``: peft's, ``FEATURE_EXTRACTION`` for a
    base model without lm_head (the reward model's backbone)."""
    import peft  # noqa: PLC0415

    vocab_size = model.get_input_embeddings().weight.shape[0]
    for i, token in enumerate(lora.trainable_token_indices or []):
        if token >= vocab_size:
            raise ValueError(f"lora.trainable_token_indices[{i}]: {token} is outside the vocabulary of {vocab_size}")
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        trainable_token_indices=lora.trainable_token_indices or None,
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs
    need no requires_grad). transformers >= 5.2x names it ``activation_checkpointing_enable``;
    older 5.x releases only have ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def policy_sequence_logprobs(
    model, batch: dict[str, Tensor], *, average: bool = False, fused: bool | str = "auto"
) -> Tensor:
    """Sequence log-probs ``[2B]`` of the batch's responses under ``model``.

    The one place where log-probs come from a model: logits at position t predict token t+1,
    so logits[:, :-1] pair with labels[:, 1:]. ``fused``: through the fused lm_head (hidden
    states x lm_head weight, never materialising the [B, T, V] logits) when the model allows it
    (see :mod:`pyalign.integrations.hf`).
    """
    return causal_lm_sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], average=average, fused=fused
    )


def response_token_counts(batch: dict[str, Tensor]) -> Tensor:
    """Scored tokens per row ``[2B]`` (for the length-normalised NLL term)."""
    return (batch["labels"][:, 1:] != -100).sum(-1)


def model_fingerprint(path: str | Path) -> str:
    """blake2b over the config and weight files of a model folder (names and bytes), so a
    changed or replaced model is detected. Tokenizer files are covered by the tokenisation key."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ValueError(f"model.path: no weight files in {path}")
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def save_merged_model(peft_model, tokenizer, directory: str | Path) -> Path:
    """Merge the LoRA (and trained token rows) into the base weights and save an ordinary HF
    folder with the tokenizer. Written next to ``directory`` and renamed into place, so the
    folder either exists complete or not at all."""
    directory = Path(directory)
    merged = peft_model.merge_and_unload()
    with atomic_directory(directory) as partial:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return directory

