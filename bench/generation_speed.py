"""Where the SPO/DPA demos' generation time goes: pyalign.generation.generate against plain
transformers ``model.generate`` (sampling, same model, prompts, batch size, new tokens).

    python -m bench.generation_speed [--prompts 100] [--batch-sizes 50,64] [--new-tokens 8,48] [--threads 2]
                                     [--samples-per-prompt 1]

Prints one JSON object: per (batch size, new tokens) the wall seconds and new tokens/s of both,
plus the time of the prompt pass alone (one forward over the padded prompts) and model load.
With ``--samples-per-prompt n > 1`` (the demos sample 2-8 answers per prompt), transformers
uses ``num_return_sequences=n`` and pyalign runs twice: as shipped (each distinct prompt read
once, its cache copied to its n rows) and with that turned off (``pyalign_prompt_per_row``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--batch-sizes", default="50,64")
    parser.add_argument("--new-tokens", default="8,48")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GenerationConfig

    from pyalign.data import encode_prompt, pad_token_id
    from pyalign.data.prompt_bank import SYSTEM_PROMPT, prompt_bank
    from pyalign.generation import cut_at_stop, generate, left_padded
    from pyalign.generation import hf as generation_hf
    from pyalign.models import load_model_and_tokenizer, smollm2_path

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(smollm2_path(), "float32")
    load_s = time.perf_counter() - start
    model.eval()
    prompts = prompt_bank()[: args.prompts]
    encoded = [encode_prompt(tokenizer, p, SYSTEM_PROMPT) for p in prompts]
    pad = pad_token_id(tokenizer)
    result = {"threads": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability(),
              "loadavg_start": os.getloadavg(), "prompts": len(prompts),
              "mean_prompt_tokens": sum(map(len, encoded)) / len(encoded), "load_model_s": round(load_s, 2),
              "samples_per_prompt": args.samples_per_prompt, "runs": []}
    n = args.samples_per_prompt

    def hf_generate(batch_size, new_tokens):
        tokens = 0
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, num_return_sequences=n)
        per_batch = max(1, batch_size // n)  # prompts per batch: batch_size rows, as pyalign batches rows
        for s in range(0, len(order), per_batch):
            ids, mask = left_padded([encoded[i] for i in order[s:s + per_batch]], pad)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in out[:, ids.shape[1]:].tolist():
                tokens += len(cut_at_stop(row, {tokenizer.eos_token_id, pad})[0])
        return tokens

    def prefill(batch_size):
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for s in range(0, len(order), batch_size):
            ids, mask = left_padded([encoded[i] for i in order[s:s + batch_size]], pad)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

    def pyalign_generate(batch_size, new_tokens, share=True):
        shared = generation_hf.shared_prompt_cache
        if not share:
            generation_hf.shared_prompt_cache = lambda *a, **kw: {}
        try:
            return sum(len(s.token_ids) for r in generate(
                model, tokenizer, prompts, system=SYSTEM_PROMPT, n=n, max_new_tokens=new_tokens, temperature=1.0,
                top_p=0.95, seed=0, batch_size=batch_size, progress=None) for s in r)
        finally:
            generation_hf.shared_prompt_cache = shared

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for new_tokens in [int(n) for n in args.new_tokens.split(",")]:
            row = {"batch_size": batch_size, "new_tokens": new_tokens}
            runs = [("pyalign", lambda: pyalign_generate(batch_size, new_tokens))]
            if n > 1:
                runs.append(("pyalign_prompt_per_row", lambda: pyalign_generate(batch_size, new_tokens, share=False)))
            runs += [("transformers", lambda: hf_generate(batch_size, new_tokens)),
                     ("prefill_only", lambda: prefill(batch_size) or 0)]
            for name, fn in runs:
                best = cpu_best = None
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    tokens = fn()
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                    best = seconds if best is None else min(best, seconds)
                    cpu_best = cpu if cpu_best is None else min(cpu_best, cpu)
                # CPU seconds: on a shared machine (load above the core count) wall time measures
                # the other jobs; with one thread, process CPU time is the work itself.
                row[name] = {"seconds": round(best, 2), "cpu_seconds": round(cpu_best, 2), "new_tokens": tokens,
                             "tokens_per_s": round(tokens / best, 1) if tokens else None,
                             "tokens_per_cpu_s": round(tokens / cpu_best, 1) if tokens else None}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
