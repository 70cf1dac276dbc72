"""Prompts and self-sampled responses of the SPO demos (the pair recipe is in
:mod:`pyalign.demo.spo_data`).

- Prompts: a deterministic bank of short, diverse instructions (templates x topics), split into
  training and held-out prompts by a seeded shuffle.
- Responses: ONE response per prompt sampled from pi_0 itself, cached on disk under a key of the
  model, the prompts and the sampling settings. The demos put the same text on both sides of a
  pair, so that the marker slots are the only difference between preferred and dispreferred
  (with two independent samples, their random text differences dominate the DPO margin).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pyalign.data.prompt_bank import SYSTEM_PROMPT, prompt_bank
from pyalign.generation import GENERATION_VERSION, generate
from pyalign.io import write_json_atomic


def split_prompts(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out prompts from a seeded shuffle of the bank."""
    prompts = prompt_bank()
    if num_train < 1 or num_eval < 1 or num_train + num_eval > len(prompts):
        raise ValueError(
            f"num_train + num_eval must be between 2 and {len(prompts)} (both >= 1), "
            f"got num_train={num_train}, num_eval={num_eval}"
        )
    random.Random(seed).shuffle(prompts)
    return prompts[:num_train], prompts[num_train:num_train + num_eval]


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled from the model (all of it is part of the cache key)."""

    num_per_prompt: int = 1
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 32
    system: str | None = SYSTEM_PROMPT


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identity of a model folder for the response cache: config, tokenizer files and weight
    file sizes (hashing 500 MB of weights on every run would cost more than it protects)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def sample_responses(model, tokenizer, prompts: Sequence[str], settings: SamplingSettings, *,
                     model_id: str, cache_dir: str | os.PathLike | None = None) -> list[list[str]]:
    """``settings.num_per_prompt`` responses per prompt sampled from ``model``, as text.

    Cached as JSON in ``cache_dir`` under a key of (model_id, prompts, settings); a cache hit
    skips generation entirely.
    """
    key_source = json.dumps({"model": model_id, "prompts": list(prompts), "settings": asdict(settings),
                             "generation": GENERATION_VERSION}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()
    cache_file = Path(cache_dir) / f"responses-{key[:24]}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached["responses"]

    generated = generate(
        model, tokenizer, prompts, system=settings.system, n=settings.num_per_prompt,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        seed=settings.seed, batch_size=settings.batch_size, progress="sampling responses",
    )
    responses = [[sample.text for sample in samples] for samples in generated]

    if cache_file is not None:
        write_json_atomic(cache_file, {"key": key, "settings": asdict(settings), "prompts": list(prompts),
                                       "responses": responses}, indent=None)
    return responses
