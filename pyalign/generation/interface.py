"""``generate`` and ``generate_jsonl``: prompts -> batches -> a backend (transformers or vLLM) -> samples,
sharded over processes and gathered in order; ``load_for_generation`` picks the backend for a folder.

The guarantees and the examples are in the package docstring (:mod:`pyalign.generation`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from pyalign import distributed
from pyalign.data import encode_prompt
from pyalign.data.pairs import prompt_json
from pyalign.generation import hf as generation_hf
from pyalign.generation.prompts import check_prompts, occurrence_numbers
from pyalign.generation.settings import BACKENDS, GenerationSettings, Sample, row_seed, stop_token_ids_of
from pyalign.io import JsonlAppender, read_jsonl_rows


def _is_vllm_engine(model) -> bool:
    return type(model).__module__.startswith("vllm")


def _pick_backend(model, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if _is_vllm_engine(model):
        if backend == "hf":
            raise ValueError("backend: 'hf' needs a transformers model, got a vllm engine")
        return "vllm"
    if isinstance(model, torch.nn.Module):
        if backend == "vllm":
            raise ValueError("backend: 'vllm' needs a vllm.LLM (see pyalign.generation.load_for_generation), "
                             "got a torch module")
        return "hf"
    raise ValueError(f"model: expected a transformers model or a vllm.LLM, got {type(model).__name__} "
                     "(for a model folder use pyalign.generation.load_for_generation)")


def load_for_generation(path: str | os.PathLike, *, backend: str = "auto", dtype: str = "float32", **vllm_kwargs):
    """``(model, tokenizer)`` for :func:`generate` from a model folder: a ``vllm.LLM`` when
    ``backend="vllm"``, or ``"auto"`` and ``vllm`` is importable; else the transformers model
    in eval mode (:func:`pyalign.models.load_model_and_tokenizer`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    from pyalign.generation import vllm as generation_vllm  # noqa: PLC0415

    if backend == "vllm" or (backend == "auto" and generation_vllm.available()):
        return generation_vllm.load(path, dtype=dtype, **vllm_kwargs)
    from pyalign.models import load_model_and_tokenizer  # noqa: PLC0415

    return load_model_and_tokenizer(path, dtype)


def generate(model, tokenizer, prompts: Sequence, *, system: str | None | Sequence[str | None] = None,
             n: int = 1, max_new_tokens: int = 128, do_sample: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 16,
             stop_token_ids: Sequence[int] | None = None, first_token_ids: Sequence[int] | None = None,
             progress: str | None = "generating", backend: str = "auto") -> list[list[Sample]]:
    """``n`` samples for every prompt: ``result[i][j]`` is sample ``j`` of ``prompts[i]``.

    A prompt is a text or a conversation: a list of ``{"role", "content"}`` messages ending with
    the user's turn (a leading system message allowed when ``system`` gives none for it).
    ``system``: one system prompt for all (None: none), or one per prompt. ``batch_size``: rows
    (prompt x sample) per forward batch. ``first_token_ids``: also report each sample's
    probability of starting with each of these tokens (transformers backend only).
    ``progress``: tqdm label (None: no bar; only rank 0 shows one). ``backend``: ``"auto"``
    (by the type of ``model``), ``"hf"`` or ``"vllm"``. Reproducibility: module docstring.
    """
    settings = GenerationSettings(n=n, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed,
                                  stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids))
    prompts, systems = check_prompts(prompts, system)
    return _generate(model, tokenizer, prompts, systems, occurrence_numbers(prompts, systems), settings,
                     batch_size=batch_size, first_token_ids=first_token_ids, progress=progress, backend=backend)


def _generate(model, tokenizer, prompts, systems, occurrences, settings: GenerationSettings, *, batch_size,
              first_token_ids, progress, backend) -> list[list[Sample]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    chosen = _pick_backend(model, backend)
    if first_token_ids is not None:
        if chosen == "vllm":
            raise ValueError("first_token_ids: not supported by the vLLM backend; use a transformers model")
        first_token_ids = [int(t) for t in first_token_ids]
        if not first_token_ids:
            raise ValueError("first_token_ids: expected a non-empty list of token ids")

    mine = distributed.shard_indices(len(prompts))
    stop_ids = stop_token_ids_of(model, tokenizer, settings.stop_token_ids) if chosen == "hf" else None
    rows = []
    for i in mine:
        prompt_ids = encode_prompt(tokenizer, prompts[i], systems[i])
        for j in range(settings.n):
            rows.append((prompt_ids, row_seed(settings.seed, systems[i], prompts[i], occurrences[i], j)))

    from tqdm.auto import tqdm  # noqa: PLC0415

    with tqdm(total=len(rows), desc=progress, unit="sample", leave=False,
              disable=progress is None or not distributed.is_main()) as bar:
        if chosen == "hf":
            generated = generation_hf.generate_rows(model, tokenizer, rows, settings, stop_ids, batch_size,
                                                     first_token_ids, bar)
        else:
            from pyalign.generation import vllm as generation_vllm  # noqa: PLC0415

            generated = generation_vllm.generate_rows(model, tokenizer, rows, settings, bar)

    local = []
    for k in range(len(mine)):
        samples = []
        for tokens, reason, probs in generated[k * settings.n:(k + 1) * settings.n]:
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            samples.append(Sample(text, tokens, reason, probs))
        local.append(samples)
    return distributed.gather_in_order(local)


def generate_jsonl(path: str | os.PathLike, model, tokenizer, prompts: Sequence, *,
                   system: str | None | Sequence[str | None] = None, n: int = 1, max_new_tokens: int = 128,
                   do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int = 0, batch_size: int = 16, stop_token_ids: Sequence[int] | None = None,
                   first_token_ids: Sequence[int] | None = None, progress: str | None = "generating",
                   backend: str = "auto", chunk_size: int = 64) -> list[list[Sample]]:
    """:func:`generate` written row by row to ``path`` (JSONL, one row per prompt:
    ``{"index", "prompt", "system", "settings", "samples": [Sample fields]}``; ``prompt`` is the
    text or the list of messages), resumable: a
    rerun after a kill keeps the complete rows already there and generates the rest, chunk of
    ``chunk_size`` prompts by chunk. Rows are checked against the call (same prompt, system and
    settings fingerprint) so a file made with other settings is refused, not reused. Since every
    sample has its own seed, the resumed file equals an uninterrupted run's. Only rank 0 writes;
    every rank returns the full result."""
    settings = GenerationSettings(n=n, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed,
                                  stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    prompts, systems = check_prompts(prompts, system)
    occurrences = occurrence_numbers(prompts, systems)
    fingerprint = settings.fingerprint()
    if first_token_ids is not None:
        fingerprint += ":first_token_ids=" + ",".join(str(int(t)) for t in first_token_ids)

    path = Path(path)
    done = read_jsonl_rows(path)
    if len(done) > len(prompts):
        raise ValueError(f"{path}: has {len(done)} rows but {len(prompts)} prompts were given; "
                         "it belongs to another call (delete it or write elsewhere)")
    for position, row in enumerate(done):
        if (row.get("index") != position or row.get("prompt") != prompt_json(prompts[position])
                or row.get("system") != systems[position] or row.get("settings") != fingerprint):
            raise ValueError(f"{path}: row {position} was generated for another prompt, system prompt or "
                             "settings (a stale file: delete it or write elsewhere)")
    results = [[Sample(**s) for s in row["samples"]] for row in done]
    distributed.barrier()  # every rank has read the file before rank 0 appends to it

    with JsonlAppender(path) if distributed.is_main() else contextlib.nullcontext() as out:
        for start in range(len(done), len(prompts), chunk_size):
            stop = min(start + chunk_size, len(prompts))
            chunk = _generate(model, tokenizer, prompts[start:stop], systems[start:stop], occurrences[start:stop],
                              settings, batch_size=batch_size, first_token_ids=first_token_ids,
                              progress=None if progress is None else f"{progress} {start}/{len(prompts)}",
                              backend=backend)
            if out is not None:
                for offset, samples in enumerate(chunk):
                    out.write({"index": start + offset, "prompt": prompt_json(prompts[start + offset]),
                               "system": systems[start + offset], "settings": fingerprint,
                               "samples": [asdict(s) for s in samples]})
            results += chunk
    distributed.barrier()
    return results
