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
its implementation are in :mod:`pyalign.generation.hf`.

Under ``torchrun`` (the process group started, e.g. by :func:`pyalign.distributed.init_from_env`)
each rank generates the prompts of its strided shard (:func:`pyalign.distributed.shard`) and
:func:`pyalign.distributed.gather_in_order` returns the full, ordered result on every rank.

Backends: ``transformers`` (a ``torch.nn.Module``, peft models included) and vLLM
(:mod:`pyalign.generation.vllm`, a ``vllm.LLM``, or a model folder when ``vllm`` is importable);
same arguments, same :class:`Sample` results, and the same per-row seeding idea (each vLLM
request carries its row's seed), though the two engines' random streams differ.
"""

from pyalign.generation.hf import TOP_P_CANDIDATES, left_padded, sample_tokens
from pyalign.generation.interface import generate, generate_jsonl, load_for_generation
from pyalign.generation.prompts import (
    check_prompt, check_prompts, check_texts, hashable_prompt, occurrence_numbers, per_prompt,
)
from pyalign.generation.settings import (
    BACKENDS, FINISH_REASONS, GENERATION_VERSION, GenerationSettings, Sample, cut_at_stop, row_seed,
    stop_token_ids_of,
)

__all__ = [
    "BACKENDS", "FINISH_REASONS", "GENERATION_VERSION", "TOP_P_CANDIDATES", "GenerationSettings", "Sample",
    "check_prompt", "check_prompts", "check_texts", "cut_at_stop", "generate", "generate_jsonl", "hashable_prompt",
    "left_padded", "load_for_generation", "occurrence_numbers", "per_prompt", "row_seed", "sample_tokens", "stop_token_ids_of",
]
