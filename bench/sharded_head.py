"""The fused lm_head under FSDP2 on the CPU (SPEC 3.9): all-gathering the sharded lm_head weight
(``sharded_head="gather"``) against the vocabulary-parallel log-softmax (``"vocab_parallel"``) and
``"auto"``, through :func:`pyalign.models.fused_head.causal_lm_sequence_logprobs` on a Llama-style
model with SmolLM2-135M's lm_head (H=576, V=49152), in gloo processes this command spawns.

    python -m bench.sharded_head              # 2 processes x 2 sequences x 1024 tokens, fp32
    flock /tmp/pyalign-cpu.lock python -m bench.sharded_head --tokens 2048

Layouts (``fully_shard`` on each decoder layer and the root in both):

- ``own``: the lm_head is an FSDP module of its own, as transformers' FSDP plan and torchtitan shard
  it: here "gather" all-gathers the weight (and reduce-scatters its gradient) for the head alone,
  while "vocab_parallel" never gathers it;
- ``root``: the lm_head is in the root's group (``pyalign.train.sharding``'s layout): FSDP
  all-gathers it with the embeddings for every forward anyway.

Per process and strategy: the step (forward + backward of a weighted sum of sequence log-probs),
median and spread of ``--repeats`` steps after ``--warmup``, the strategies interleaved round by
round so that a drifting load hits them alike, each repeat's time the slower process's; peak memory
of one more step above what was allocated before it: torch's allocations (profiler events, every
tensor torch allocates, FSDP's all-gather and reduce-scatter buffers included) and the resident-set
high-water mark. The token log-probs of every strategy are compared with "gather"'s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from bench import common, report

STRATEGIES = ("gather", "vocab_parallel", "auto")
LAYOUTS = ("own", "root")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.sharded_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="gloo processes (one CPU thread each by default)")
    parser.add_argument("--seqs", type=int, default=2, help="sequences per process")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (the first quarter ignored)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (the head dominates the step)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {LAYOUTS}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {STRATEGIES}")
    parser.add_argument("--frozen-head", action="store_true", help="lm_head weight without gradient (as under LoRA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=3000, help="seconds before the processes are killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    args.layouts = _subset(args.layouts, LAYOUTS, "--layouts")
    args.strategies = _subset(args.strategies, STRATEGIES, "--strategies")
    for name in ("processes", "seqs", "tokens", "vocab", "hidden", "layers", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.tokens < 4:
        parser.error("--tokens: expected at least 4 (a quarter of them are the prompt)")
    return args


def _subset(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {allowed}, got {text!r}")
    return items


# --------------------------------------------------------------------------- one process


def build_model(args, layout: str):
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's layer at H=576 (9 heads of 64, 3 key/value heads, MLP 1536); other sizes: 4 / 2 heads.
    heads, kv_heads = (9, 3) if args.hidden % 9 == 0 else (4, 2)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=8 * args.hidden // 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(2048, args.tokens), tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits with a spread like a trained model's, not near-uniform
        model.lm_head.weight.mul_(4.0)
    if args.frozen_head:
        model.lm_head.weight.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer)
    if layout == "own":
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def make_batch(args, rank: int):
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    input_ids = torch.randint(0, args.vocab, (args.seqs, args.tokens), generator=gen)
    labels = input_ids.clone()
    labels[:, : args.tokens // 4] = -100
    return input_ids, labels


def _measure_layout(args, layout: str, rank: int, input_ids, labels) -> list[dict]:
    """This process's rows for one layout: every strategy on one sharded model."""
    import torch.distributed as dist

    from pyalign.models.fused_head import (
        causal_lm_sequence_logprobs, fused_head_or_reason, sharded_token_logprobs, shift_labels,
    )

    model = build_model(args, layout)
    head, reason = fused_head_or_reason(model, sharded=True)
    if head is None or not head.sharded:
        raise RuntimeError(f"bench.sharded_head: the fused path does not see a sharded lm_head ({reason})")
    weights = torch.linspace(0.5, 1.5, args.seqs)

    def step(strategy):
        out = causal_lm_sequence_logprobs(model, input_ids, None, labels, fused=True, sharded_head=strategy)
        (out * weights).sum().backward()
        return out

    def fresh():
        model.zero_grad(set_to_none=True)
        gc.collect()

    token_logps = {}  # per token: a sequence's float32 sum would round small differences away
    with torch.no_grad():
        for strategy in args.strategies:
            token_logps[strategy] = sharded_token_logprobs(model, head, input_ids, None, shift_labels(labels),
                                                           sharded_head=strategy)
    times = {strategy: [] for strategy in args.strategies}
    for _ in range(args.warmup):
        for strategy in args.strategies:
            fresh()
            step(strategy)
    for _ in range(args.repeats):
        for strategy in args.strategies:  # interleaved: a drifting load hits every strategy alike
            fresh()
            dist.barrier()
            start = time.perf_counter()
            step(strategy)
            times[strategy].append(time.perf_counter() - start)
    rows = []
    for strategy in args.strategies:
        fresh()
        dist.barrier()
        peak, _ = common.cpu_tensor_peak(lambda strategy=strategy: step(strategy))
        fresh()
        dist.barrier()
        rss, _ = common.rss_peak(lambda strategy=strategy: step(strategy))
        reference = token_logps.get("gather", token_logps[strategy])
        rows.append({"layout": layout, "strategy": strategy, "rank": rank, "times_s": times[strategy],
                     "alloc_peak_bytes": peak, "rss_peak_bytes": rss,
                     "logp_max_abs_diff_vs_gather": float((token_logps[strategy] - reference).abs().max())})
    fresh()
    return rows


def _worker(rank: int, args, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from pyalign import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.processes), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=args.processes, timeout=timedelta(seconds=args.timeout))
    torch.set_num_threads(args.threads)
    finished = False
    try:
        input_ids, labels = make_batch(args, rank)
        rows = []
        for layout in args.layouts:
            rows += _measure_layout(args, layout, rank, input_ids, labels)
            gc.collect()  # the layout's model is gone before the next one is built
        gathered = [None] * args.processes
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            Path(out_path).write_text(json.dumps([row for part in gathered for row in part]))
        finished = True
    finally:
        distributed.shutdown(wait_for_others=finished)


# --------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        context = mp.start_processes(_worker, args=(args, free_port(), out_path), nprocs=args.processes,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise SystemExit(f"bench.sharded_head: the processes did not finish within {args.timeout} s")
        return json.loads(Path(out_path).read_text())


def summarize(rows: list[dict], processes: int) -> list[dict]:
    """One row per layout and strategy: each repeat's time is the slower process's; memory per process."""
    table = []
    keys = []
    for row in rows:
        key = (row["layout"], row["strategy"])
        if key not in keys:
            keys.append(key)
    for layout, strategy in keys:
        ranks = sorted((r for r in rows if r["layout"] == layout and r["strategy"] == strategy), key=lambda r: r["rank"])
        per_repeat = [max(values) for values in zip(*(r["times_s"] for r in ranks))]
        q = statistics.quantiles(per_repeat, n=4, method="inclusive") if len(per_repeat) > 1 else per_repeat * 3
        table.append({
            "layout": layout, "strategy": strategy, "median_s": statistics.median(per_repeat),
            "min_s": min(per_repeat), "iqr_s": q[2] - q[0], "times_s": per_repeat,
            "alloc_peak_mib_per_rank": [r["alloc_peak_bytes"] / common.MIB for r in ranks],
            "alloc_peak_mib_max": max(r["alloc_peak_bytes"] for r in ranks) / common.MIB,
            "rss_peak_mib_max": (max(r["rss_peak_bytes"] for r in ranks) / common.MIB
                                 if all(r["rss_peak_bytes"] is not None for r in ranks) else None),
            "logp_max_abs_diff_vs_gather": max(r["logp_max_abs_diff_vs_gather"] for r in ranks),
        })
    by_layout = {}
    for row in table:
        by_layout.setdefault(row["layout"], {})[row["strategy"]] = row
    for row in table:
        gather = by_layout[row["layout"]].get("gather")
        if gather:
            row["time_vs_gather"] = row["median_s"] / gather["median_s"]
            row["alloc_peak_vs_gather_mib"] = row["alloc_peak_mib_max"] - gather["alloc_peak_mib_max"]
    return table


COLUMNS = [("layout", "layout", ""), ("strategy", "strategy", ""), ("step s (median)", "median_s", ".3f"),
           ("min s", "min_s", ".3f"), ("IQR s", "iqr_s", ".3f"), ("vs gather", "time_vs_gather", ".3f"),
           ("torch alloc peak MiB (max rank)", "alloc_peak_mib_max", ".1f"),
           ("vs gather MiB", "alloc_peak_vs_gather_mib", "+.1f"), ("RSS peak MiB (max rank)", "rss_peak_mib_max", ".1f"),
           ("max abs diff of token logp vs gather", "logp_max_abs_diff_vs_gather", ".1e")]


def render_markdown(payload: dict) -> str:
    env, s = payload["environment"], payload["settings"]
    kept = s["seqs"] * (s["tokens"] - s["tokens"] // 4)
    weight_mib = s["vocab"] * s["hidden"] * 4 / common.MIB
    return "\n".join([
        f"# Sharded lm_head under FSDP2, CPU + gloo ({env['device']})", "",
        report.versions_line(env, "transformers"),
        (f"`{env['command']}`; ATen CPU capability {env.get('aten_cpu_capability')}, {s['threads']} thread(s) per "
         f"process x {s['processes']} processes on {env.get('cpu_count')} CPUs; load average at start "
         f"{s['load_average_start']}, at end {s['load_average_end']}"), "",
        (f"{s['processes']} processes x {s['seqs']} sequences x {s['tokens']} tokens ({kept} scored per process), "
         f"H={s['hidden']}, V={s['vocab']} (lm_head {weight_mib:.0f} MiB fp32, {weight_mib / s['processes']:.0f} MiB "
         f"per shard), {s['layers']} decoder layer(s), fp32, lm_head weight "
         f"{'frozen' if s['frozen_head'] else 'trained'}; forward + backward of a weighted sum of sequence "
         f"log-probs through pyalign.models.fused_head; median of {s['repeats']} steps after {s['warmup']} "
         "(each step's time the slower process's); peak memory of one more step above what was allocated "
         "before it, the larger of the processes' (torch: the profiler's allocation events; RSS: the "
         "resident-set high-water mark)."), "",
        report.markdown_table(payload["rows"], COLUMNS),
    ])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the environment record reports the workers' thread count
    env = report.environment(torch.device("cpu"), "bench.sharded_head", argv)
    for name in ("transformers",):
        env[name] = report.package_version(name)
    settings = {name: getattr(args, name) for name in ("processes", "seqs", "tokens", "vocab", "hidden", "layers",
                                                       "layouts", "strategies", "frozen_head", "warmup", "repeats",
                                                       "threads", "seed")}
    settings["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    raw = run_processes(args)
    settings["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    payload = {"environment": env, "settings": settings, "rows": summarize(raw, args.processes), "per_rank": raw}
    stem = report.result_stem("sharded_head", torch.device("cpu"), env["timestamp_utc"])
    if args.frozen_head:
        stem += "_frozen"
    markdown = render_markdown(payload)
    paths = report.write_outputs(Path(args.out), stem, payload, markdown, None)
    print(markdown)
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
