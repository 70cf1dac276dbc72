"""vLLM behind :func:`pyalign.generation.generate` (used when ``vllm`` is importable).

Thin on purpose: the prompts are the same chat-templated token ids as the transformers backend
(:func:`pyalign.data.encode_prompt`), given to vLLM as ``{"prompt_token_ids": ...}``; each row
(prompt x sample) is one request with ``n=1`` and its own ``seed`` (the row seed of
:func:`pyalign.generation.row_seed`), so, as with transformers, a sample does not depend on
what else is in the call. vLLM's random streams are its own: the two backends give different
samples for the same seed (greedy decoding agrees up to the engines' numerics).

``vllm`` is not a dependency of pyalign and is imported only inside these functions.
"""

from __future__ import annotations

import importlib.util
import os

INSTALL_HINT = "pip install vllm (needs a CUDA machine)"


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"backend 'vllm': the package vllm is not importable ({error}); {INSTALL_HINT}") from None
    return vllm


def load(path: str | os.PathLike, *, dtype: str = "float32", **llm_kwargs):
    """``(vllm.LLM, tokenizer)`` for a model folder. ``llm_kwargs`` go to ``vllm.LLM``
    (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``)."""
    vllm = _import_vllm()
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # as pyalign.models.load_model_and_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    llm_kwargs.setdefault("seed", 0)
    return vllm.LLM(model=str(path), tokenizer=str(path), dtype=dtype, **llm_kwargs), tokenizer


def sampling_params(settings, seed: int, stop_token_ids):
    """The ``vllm.SamplingParams`` of one row (``settings``: a GenerationSettings)."""
    vllm = _import_vllm()
    return vllm.SamplingParams(
        n=1,
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature if settings.do_sample else 0.0,
        top_p=settings.top_p if settings.do_sample else 1.0,
        top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
        seed=seed,
        stop_token_ids=list(stop_token_ids),
        skip_special_tokens=True,
        detokenize=False,  # pyalign decodes the kept ids itself, as for transformers
    )


def generate_rows(llm, tokenizer, rows, settings, bar) -> list[tuple[list[int], str, None]]:
    """``rows``: ``[(prompt_ids, seed)]`` -> ``(token_ids, finish_reason, None)`` per row, in
    order (token ids cut before the first stop token, as the transformers backend does)."""
    from pyalign.generation.settings import cut_at_stop, stop_token_ids_of  # noqa: PLC0415

    stop_ids = stop_token_ids_of(None, tokenizer, settings.stop_token_ids)
    prompts = [{"prompt_token_ids": list(ids)} for ids, _ in rows]
    params = [sampling_params(settings, seed, stop_ids) for _, seed in rows]
    outputs = llm.generate(prompts, params, use_tqdm=False) if rows else []
    results = []
    stop_set = set(stop_ids)
    for output in outputs:
        completion = output.outputs[0]
        tokens, reason = cut_at_stop(list(completion.token_ids), stop_set)
        if reason == "length" and completion.finish_reason == "stop":
            reason = "eos"  # vLLM stopped on a token it does not report (e.g. its own EOS)
        results.append((tokens, reason, None))
    bar.update(len(rows))
    return results
