"""What decides a sample besides the model and the prompt: the settings (checked when built), each
sample's seed, where a row stops; and what a sample is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# Bump when the sampling recipe (pyalign.generation.hf) changes: it changes which tokens a seed gives, so caches of
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


def cut_at_stop(token_ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return list(token_ids[:position]), "eos"
    return list(token_ids), "length"
