"""The transformers backend of :func:`pyalign.generation.generate`, and the per-row sampler.

Rows (prompt x sample) are left-padded into batches and decoded by ``model.generate`` with the
model's KV cache (a prompt repeated in a batch is read once: :func:`shared_prompt_cache`); a
logits processor (:class:`RowSampler`) picks every row's next token from the row's own random
stream and hands transformers scores whose argmax is that token (``do_sample=False``), so no
other row, batch or the global RNG takes part in a row's draw.

Sampling one token (``do_sample=True``): ``p = softmax(logits / temperature)``. Without top-p
or top-k: draw ``u ~ U[0, 1)`` from the row's stream and take the first token, in token-id
order, whose cumulative probability exceeds ``u`` (inverse-CDF sampling). With them: order the
tokens by decreasing ``p``, keep the first ``top_k`` (``top_k=0``: all) and, of those, the
smallest prefix whose mass reaches ``top_p`` (token i is kept when the mass before it is
``< top_p``), and take the first kept token whose cumulative kept mass exceeds ``u`` times the
kept total. One uniform per token, so a row's stream advances exactly once per generated token.
``do_sample=False``: argmax.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import torch

from pyalign.data import pad_token_id
from pyalign.generation.settings import cut_at_stop

# Candidates read with top-k before falling back to a full sort, when top-p needs more mass.
TOP_P_CANDIDATES = 256


def left_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token-id lists padded on the left to the longest: a
    decoder-only model then continues every row from its last column."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` by inverse-CDF sampling with ``uniforms``
    ``[B]`` in [0, 1) (the recipe of the module docstring). Returns token ids ``[B]``.

    Only what a row needs is sorted: without top-p/top-k the CDF runs in token-id order (no
    sort); with them, over the ``top_k`` (or ``TOP_P_CANDIDATES``) largest probabilities, and a
    row whose nucleus is not within those is redone with all of them. A full sort of a
    49152-token vocabulary costs ~20x a top-256 (measured in docs/generation.md). Every decision
    is per row, so a row's token does not depend on the other rows."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    limit = vocab if top_k == 0 else min(top_k, vocab)
    u = uniforms.to(device=probs.device, dtype=probs.dtype)[:, None]
    if top_p >= 1.0 and limit == vocab:
        cdf = probs.cumsum(-1)
        position = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        overflow = position >= vocab  # u * total rounded up to the total: the last non-zero token
        if bool(overflow.any()):
            nonzero = (probs[overflow] > 0).long() * torch.arange(1, vocab + 1, device=probs.device)
            position[overflow] = nonzero.argmax(-1)
        return position

    width = limit if top_p >= 1.0 else min(limit, TOP_P_CANDIDATES)
    values, order = probs.topk(width, dim=-1)
    if width < limit:
        short = values.sum(-1) < top_p  # the nucleus reaches beyond the candidates
        if bool(short.any()):
            rows = short.nonzero().flatten()
            more_values, more_order = probs[rows].topk(limit, dim=-1)
            values = torch.cat([values, values.new_zeros(len(values), limit - width)], -1)
            order = torch.cat([order, order.new_zeros(len(order), limit - width)], -1)
            values[rows], order[rows] = more_values, more_order
    keep = values > 0  # (also drops the zero padding of rows that needed no more candidates)
    if top_p < 1.0:
        keep &= (values.cumsum(-1) - values) < top_p
    keep[:, 0] = True  # the most likely token is always a candidate
    cdf = (values * keep).cumsum(-1)
    position = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    position = torch.minimum(position, keep.sum(-1, keepdim=True) - 1)
    return order.gather(-1, position).squeeze(-1)


class RowSampler:
    """A transformers logits processor that picks each row's next token itself (from the row's
    own random stream) and returns scores whose argmax is that token; run with
    ``do_sample=False`` so transformers takes the argmax. Also reads the first step's raw
    logits for ``first_token_ids``."""

    def __init__(self, seeds: Sequence[int], settings, first_token_ids):
        self.streams = [random.Random(s) for s in seeds]
        self.settings = settings
        self.first_token_ids = None if first_token_ids is None else list(first_token_ids)
        self.first_probs: list[list[float]] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_token_ids is not None and self.first_probs is None:
            self.first_probs = scores.float().softmax(-1)[:, self.first_token_ids].tolist()
        s = self.settings
        if s.do_sample:
            uniforms = torch.tensor([stream.random() for stream in self.streams], dtype=torch.float64)
            tokens = sample_tokens(scores, uniforms, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            tokens = scores.argmax(-1)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, tokens[:, None], 0.0)
        return chosen


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompts: Sequence[Sequence[int]]) -> dict:
    """``generate`` keyword arguments that hand it the batch's prompts already read, but for
    their last token: each distinct prompt is run through the model once and its KV cache copied
    to every row that repeats it (the ``n`` samples of a prompt sit together in a batch), so
    ``generate`` reads only the last prompt column before sampling. ``{}`` when no prompt repeats.

    The cached part is computed exactly as ``generate`` computes a prompt (same left-padded
    layout, positions from the attention mask), so each row continues from the same state; only
    the batch's row count in those matmuls differs (docs/generation.md, "Prompts read once")."""
    owner_of: dict[tuple, int] = {}  # prompt -> its index among the distinct prompts
    first_rows: list[int] = []  # the row each distinct prompt is read from
    owners = []
    for row, prompt in enumerate(prompts):
        key = tuple(prompt)
        if key not in owner_of:
            owner_of[key] = len(first_rows)
            first_rows.append(row)
        owners.append(owner_of[key])
    if len(first_rows) == len(prompts) or input_ids.shape[1] < 2:
        return {}
    from transformers import DynamicCache  # noqa: PLC0415

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    parameters = inspect.signature(base.forward).parameters
    cache_key = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
    distinct = torch.tensor(first_rows, device=input_ids.device)
    ids, mask = input_ids[distinct, :-1], attention_mask[distinct, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # generate's rule for left padding
    cache = DynamicCache(config=base.config)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_key: cache}, **extra)
    cache.batch_select_indices(torch.tensor(owners, device=input_ids.device))
    return {cache_key: cache}


def generate_rows(model, tokenizer, rows, settings, stop_ids: list[int],
                      batch_size: int, first_token_ids, bar) -> list[tuple[list[int], str, list[float] | None]]:
    """``rows``: ``[(prompt_ids, seed)]``. Returns ``(token_ids, finish_reason, first_probs)``
    per row, in order. Rows are batched longest prompt first (least padding; an out-of-memory
    error shows in the first batch)."""
    from transformers import GenerationConfig  # noqa: PLC0415


    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    # A fresh config: what the caller asked for, not sampling defaults from the model's
    # generation_config.json (those would run before our sampler as logits processors).
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop_ids,
        pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        renormalize_logits=False, return_dict_in_generate=False,
    )
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    results: list = [None] * len(rows)
    stop_set = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            prompts = [rows[i][0] for i in batch]
            input_ids, attention_mask = left_padded(prompts, pad)
            width = input_ids.shape[1]
            sampler = RowSampler([rows[i][1] for i in batch], settings, first_token_ids)
            with torch.no_grad():
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    generation_config=config, logits_processor=[sampler],
                    **shared_prompt_cache(model, input_ids, attention_mask, prompts),
                )
            for r, i in enumerate(batch):
                tokens, reason = cut_at_stop(output[r, width:].tolist(), stop_set)
                probs = None if sampler.first_probs is None else sampler.first_probs[r]
                results[i] = (tokens, reason, probs)
            bar.update(len(batch))
    finally:
        model.train(was_training)
    return results
