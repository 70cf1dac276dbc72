"""Marker-token surgery: new special tokens with embedding rows that look like typical rare tokens
(the SPO demo's dimensions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def add_marker_tokens(model, tokenizer, markers: Sequence[str], *, seed: int = 0) -> list[int]:
    """Add ``markers`` to the tokenizer as special tokens (each one token, never split) and give
    them embedding rows. Returns their token ids in the order given.

    Each new row is drawn from a Gaussian with the existing rows' per-dimension mean and standard
    deviation (seeded): a new token looks like a typical, rare token. Why not the plain mean of
    the rows: with tied embeddings (SmolLM2) the mean row points along the direction every token
    shares, so moving the hidden state toward it raises all logits alike and cannot single the
    new token out; only its own row (a few hundred parameters moving ~lr per Adam step) could,
    and preference training then widens its margins by pushing the ordinary tokens down instead
    (measured in docs/demo.md). For an untied lm_head its rows are drawn the same way from the
    existing output rows. With tied embeddings input and output are one tensor, drawn once.
    """
    markers = list(markers)
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers must be a non-empty list of non-empty strings, got {markers!r}")
    if len(set(markers)) != len(markers):
        raise ValueError(f"markers must be distinct, got {markers!r}")

    old_vocab = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(markers)
    new_vocab = max(len(tokenizer), max(ids) + 1)
    if new_vocab > old_vocab:
        model.resize_token_embeddings(new_vocab, mean_resizing=False)

    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        outputs = model.get_output_embeddings()
        new_ids = [i for i in ids if i >= old_vocab]
        if new_ids:
            inputs[new_ids] = _typical_rows(inputs[:old_vocab], len(new_ids), seed)
            if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
                outputs.weight[new_ids] = _typical_rows(outputs.weight[:old_vocab], len(new_ids), seed + 1)
                if getattr(outputs, "bias", None) is not None:
                    outputs.bias[new_ids] = outputs.bias[:old_vocab].mean()
    return list(ids)


def _typical_rows(rows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` rows drawn from N(mean, diag(std^2)) of ``rows`` (a seeded generator, so the
    global RNG is untouched and the result is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    mean, spread = rows.float().mean(0), rows.float().std(0)
    noise = torch.randn(count, rows.shape[1], generator=generator)
    return (mean + noise * spread).to(rows.dtype)
