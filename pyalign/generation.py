"""Batched sampling from a chat model: ``generate(model, tokenizer, prompts) -> [prompt][sample]``.

One function serves every caller that needs a policy's responses (the SPO demo, DPA rejection
sampling, CLAIR revisions, evaluation): a prompt is a text (one user turn) or a conversation
(a list of ``{"role", "content"}`` chat messages ending with the user's turn, as the data layer
reads multi-turn prompts); prompts go through the tokenizer's chat template
(:func:`pyalign.data.encode_prompt`, exactly as training encodes them; optional system prompt
per call or per prompt), rows are
left-padded into batches and decoded with the model's KV cache (``transformers``' ``generate``),
each row stops at its first stop token (EOS), and every sample comes back as a :class:`Sample`
with its text and token ids. docs/generation.md has the examples and the settings.

Reproducibility (what is guaranteed, and tested in tests/test_generation.py):

- Sample ``j`` of a prompt draws its randomness from its own stream, seeded by
  ``(seed, system, prompt, occurrence, j)`` where ``occurrence`` counts earlier identical
  ``(system, prompt)`` entries in the list (a conversation is keyed by its messages' roles and
  contents, so it never shares a stream with a text prompt, not even a one-message conversation
  whose text is the same). No other row, batch or process touches that stream, and the global
  torch RNG is neither used nor changed.
- Hence, for a fixed model and settings, a sample's token ids do not depend on the batch size,
  the order of the batches, the order of the prompt list, the other prompts in it, the number of
  samples ``n`` asked for (sample ``j`` is the same for any ``n > j``), or the number of
  processes (``torchrun``): they are a function of the row's own key, *given the model's
  logits*. The one thing not guaranteed bit for bit: the logits themselves may differ in the
  last float bits between batch compositions (a row's padding width changes the length of the
  attention reductions, and a GEMM's blocking may depend on the number of rows). A sampled token
  changes only if its uniform draw falls within that rounding of a boundary of the cumulative
  distribution (greedy: only on an exact near-tie), which our tests on the tiny model in fp32 on
  CPU never see; docs/generation.md gives the measured logit differences on SmolLM2.

Sampling one token (inverse-CDF, one uniform per token, temperature/top-k/top-p): the recipe and
its implementation are in :mod:`pyalign.generation_hf`.

Under ``torchrun`` (the process group started, e.g. by :func:`pyalign.distributed.init_from_env`)
each rank generates the prompts of its strided shard (:func:`pyalign.distributed.shard`) and
:func:`pyalign.distributed.gather_in_order` returns the full, ordered result on every rank.

Backends: ``transformers`` (a ``torch.nn.Module``, peft models included) and vLLM
(:mod:`pyalign.generation_vllm`, a ``vllm.LLM``, or a model folder when ``vllm`` is importable);
same arguments, same :class:`Sample` results, and the same per-row seeding idea (each vLLM
request carries its row's seed), though the two engines' random streams differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pyalign import distributed, generation_hf
from pyalign.data import encode_prompt
from pyalign.data.pairs import RowError, check_messages, normalize_prompt, prompt_json
from pyalign.generation_hf import TOP_P_CANDIDATES, sample_tokens  # noqa: F401  (part of this module's API)
from pyalign.io import JsonlAppender, read_jsonl_rows

# Bump when the sampling recipe above changes: it changes which tokens a seed gives, so caches of
# generated samples must key on it.
GENERATION_VERSION = 2
BACKENDS = ("auto", "hf", "vllm")
FINISH_REASONS = ("eos", "length")


@dataclass(frozen=True)
class Sample:
    """One generated response. ``token_ids``: the new tokens, cut before the first stop token;
    ``text``: their decoding without special tokens, stripped; ``finish_reason``: ``"eos"``
    (a stop token was generated) or ``"length"`` (``max_new_tokens`` reached);
    ``first_token_probs``: with ``first_token_ids``, the probability of each of those tokens as
    the first generated token, from the raw logits (no temperature or top-p)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    first_token_probs: list[float] | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the samples besides the model and the prompts (validated here, so
    bad values fail before any model runs). ``fingerprint()`` keys caches of samples."""

    n: int = 1
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        def fail(name, expected, value):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")

        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            fail("n", "an integer >= 1", self.n)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "a bool", self.do_sample)
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not 0 < self.temperature < float("inf")):
            fail("temperature", "a finite number > 0 (greedy decoding: do_sample=False)", self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]", self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0: no top-k)", self.top_k)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            fail("seed", "an integer", self.seed)
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                fail("stop_token_ids", "a non-empty list of token ids", self.stop_token_ids)
            object.__setattr__(self, "stop_token_ids", ids)

    def fingerprint(self) -> str:
        payload = {"version": GENERATION_VERSION, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def row_seed(seed: int, system: str | None, prompt, occurrence: int, sample: int) -> int:
    """The 64-bit seed of one sample's random stream (see the module docstring). ``prompt``: a
    text, or chat messages (keyed as a JSON list of ``{"role", "content"}``, which no JSON string
    equals, so a conversation and a text never share a seed; text keys are unchanged)."""
    key_prompt = prompt if isinstance(prompt, str) else [{"role": m["role"], "content": m["content"]} for m in prompt]
    key = json.dumps([GENERATION_VERSION, seed, system, key_prompt, occurrence, sample], ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def stop_token_ids_of(model, tokenizer, override: Sequence[int] | None = None) -> list[int]:
    """The stop tokens: ``override``, else the tokenizer's EOS plus the model's generation
    config EOS ids (chat models often stop on an end-of-turn token too)."""
    if override is not None:
        return list(override)
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in [config_eos] if isinstance(config_eos, int) else (config_eos or []):
        if token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError("stop_token_ids: the tokenizer has no eos_token and the model no eos_token_id; pass them")
    return ids


def per_prompt(system, count: int, name: str = "system") -> list[str | None]:
    """One system prompt per prompt from ``system``: a string or None for all, or a list."""
    if system is None or isinstance(system, str):
        return [system] * count
    systems = list(system)
    if len(systems) != count:
        raise ValueError(f"{name}: expected one system prompt per prompt ({count}), got {len(systems)}")
    for i, value in enumerate(systems):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string or None, got {type(value).__name__}")
    return systems


def check_texts(values, name: str = "prompts") -> list[str]:
    """``values`` as a list of strings, or a ValueError naming ``name`` and the bad item."""
    if isinstance(values, str):
        raise ValueError(f"{name}: expected a list of strings, got a single string")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(value).__name__}")
    return values


def check_prompt(value, system: str | None, where: str):
    """One prompt: a text, or chat messages (``{"role", "content"}``; roles system/user/assistant,
    a system message only first and not together with a separate system prompt, ending with the
    user's turn: the rules of :mod:`pyalign.data.pairs`). Returns the text, or the messages as a
    tuple of ``{"role", "content"}`` dicts; a ValueError starting with ``where`` otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        raise ValueError(f"{where}: expected a string or a list of chat messages, got one message (a dict); "
                         "a conversation is a list of messages, so several prompts are a list of such lists")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a string or a list of chat messages, got {type(value).__name__}")
    try:
        messages = check_messages(value, "prompt")
        normalize_prompt(messages, "prompt", system)  # the structural rules; the form given is kept
    except RowError as error:
        raise ValueError(f"{where}: {error}") from None
    return tuple(messages)


def check_prompts(prompts, system=None, name: str = "prompts") -> tuple[list, list[str | None]]:
    """``(prompts, systems)``: every prompt checked by :func:`check_prompt` (errors name
    ``name[i]``), and one system prompt per prompt from ``system`` (:func:`per_prompt`)."""
    if isinstance(prompts, str):
        raise ValueError(f"{name}: expected a list of prompts, got a single string")
    prompts = list(prompts)
    systems = per_prompt(system, len(prompts))
    return [check_prompt(p, s, f"{name}[{i}]") for i, (p, s) in enumerate(zip(prompts, systems))], systems


def hashable_prompt(prompt):
    """A prompt as a dictionary key: the text, or a tuple of ``(role, content)`` pairs."""
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


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
    from pyalign import generation_vllm  # noqa: PLC0415

    if backend == "vllm" or (backend == "auto" and generation_vllm.available()):
        return generation_vllm.load(path, dtype=dtype, **vllm_kwargs)
    from pyalign.models import load_model_and_tokenizer  # noqa: PLC0415

    return load_model_and_tokenizer(path, dtype)


def cut_at_stop(token_ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return list(token_ids[:position]), "eos"
    return list(token_ids), "length"


def occurrence_numbers(prompts: Sequence, systems: Sequence[str | None]) -> list[int]:
    """For each position, how many identical ``(system, prompt)`` entries come before it."""
    seen: dict[tuple, int] = {}
    numbers = []
    for key in zip(systems, map(hashable_prompt, prompts)):
        numbers.append(seen.get(key, 0))
        seen[key] = numbers[-1] + 1
    return numbers


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
            from pyalign import generation_vllm  # noqa: PLC0415

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
