"""LoRA adapters on causal LMs (peft), activation checkpointing, and merging an adapter into an
ordinary HF folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyalign.io import atomic_directory


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
