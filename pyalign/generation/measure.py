"""Measure :func:`pyalign.generation.generate` on a real model: throughput per batch size, and how
far "results do not depend on the batch" holds on it (docs/generation.md quotes the output).

    python -m pyalign.generation.measure [--model DIR] [--prompts 32] [--new-tokens 48] [--threads 2]

Default model: SmolLM2-135M-Instruct (:func:`pyalign.models.smollm2_path`), float32. Prompts: the
prompt bank of :mod:`pyalign.data.prompt_bank` (the SPO demos' prompts) (varied lengths, so batches carry left padding).

Batch invariance, two ways:

- logits: the first step's raw logits of each prompt alone (no padding) against the same prompt
  inside one left-padded batch of all prompts: max |difference| and whether the argmax agrees;
- sampler cost: one sampling step on those logits (all prompts at once) against a full sort of
  the vocabulary, in milliseconds;
- samples: every prompt's sample with ``batch_size=1`` against the larger batch sizes: how
  many of the samples have identical token ids, and for the others the first position that
  differs (a flip caused by rounding, after which the two continuations are unrelated).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _cpu_isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyalign.generation.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from pyalign.data import encode_prompt
    from pyalign.data.prompt_bank import SYSTEM_PROMPT, prompt_bank
    from pyalign.generation import generate, left_padded
    from pyalign.models import load_model_and_tokenizer, smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or smollm2_path()
    model, tokenizer = load_model_and_tokenizer(folder, "float32")
    prompts = prompt_bank()[:: max(1, len(prompt_bank()) // args.prompts)][: args.prompts]
    result = {"model": str(folder), "threads": torch.get_num_threads(), "isa": _cpu_isa(),
              "machine": platform.machine(), "prompts": len(prompts), "new_tokens": args.new_tokens}

    # logits: alone vs inside one left-padded batch
    encoded = [encode_prompt(tokenizer, p, SYSTEM_PROMPT) for p in prompts]
    ids, mask = left_padded(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        alone = torch.stack([model(input_ids=torch.tensor([e])).logits[0, -1].float() for e in encoded])
    result["logits_max_abs_diff"] = float((batched - alone).abs().max())
    result["logits_argmax_agree"] = int((batched.argmax(-1) == alone.argmax(-1)).sum())
    # how often top_p=0.95 needs more than the top-k candidates (a full sort) on this model
    from pyalign.generation import TOP_P_CANDIDATES

    candidates = min(TOP_P_CANDIDATES, alone.shape[-1])
    mass = alone.softmax(-1).topk(candidates, dim=-1).values.sum(-1)
    result["first_step_rows_with_0.95_nucleus_beyond_candidates"] = int((mass < 0.95).sum())
    # the sampler's cost on these logits ([prompts, V]) against a full sort of the vocabulary
    from pyalign.generation import sample_tokens

    uniforms = torch.rand(len(alone), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    timings = {
        "full_sort": lambda: alone.sort(dim=-1, descending=True, stable=True),
        f"top{candidates}": lambda: alone.topk(candidates, dim=-1),
        "sample_top_p_0.95": lambda: sample_tokens(alone, uniforms, top_p=0.95),
        "sample_no_filter": lambda: sample_tokens(alone, uniforms),
    }
    result["sampler_ms"] = {}
    for name, run in timings.items():
        run()
        start = time.perf_counter()
        for _ in range(5):
            run()
        result["sampler_ms"][name] = round((time.perf_counter() - start) / 5 * 1e3, 2)

    # samples and throughput per batch size
    runs = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        samples = generate(model, tokenizer, prompts, system=SYSTEM_PROMPT, max_new_tokens=args.new_tokens,
                           temperature=1.0, top_p=0.95, seed=0, batch_size=batch_size, progress=None)
        seconds = time.perf_counter() - start
        tokens = sum(len(row[0].token_ids) for row in samples)
        runs[batch_size] = [row[0].token_ids for row in samples]
        result.setdefault("throughput", []).append(
            {"batch_size": batch_size, "seconds": round(seconds, 2), "new_tokens": tokens,
             "tokens_per_s": round(tokens / seconds, 1)})
    sizes = sorted(runs)
    reference = runs[sizes[0]]
    comparisons = []
    for size in sizes[1:]:
        differ = [next(i for i, (a, b) in enumerate(zip(x, y + [None] * len(x))) if a != b)
                  for x, y in zip(reference, runs[size]) if x != y]
        comparisons.append({"batch_sizes": [sizes[0], size], "identical": len(reference) - len(differ),
                            "of": len(reference), "first_differing_positions": differ})
    result["samples_vs_batch_size"] = comparisons
    print(json.dumps(result, indent=2))
    if args.json:
        from pyalign.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
