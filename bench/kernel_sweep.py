"""The Triton kernels' launch settings and the "auto" choice between Triton and the CUDA kernel,
decided by measurement (issue 12, items 1 and 9).

    python -m bench.kernel_sweep --device cuda        # on the GPU machine (~1-2 minutes)

1. Sweep: forward and backward (into a separate buffer) of the Triton kernels over pipelining
   depth (``num_stages``, 1 = plain loads) x (``block_v``, ``num_warps``) on a few cases; GB/s
   moved (kept rows read forward; kept rows read + all rows written backward) against the copy
   bandwidth measured in the same run.
2. Triton (default settings) against the CUDA kernel on one case of each kind of
   ``pyalign.ops.backends.AUTO_CUDA`` (aligned or not, many rows or few), forward + backward.

Prints, last, the lines to paste: ``AUTO_CUDA = {...}`` (pyalign/ops/backends.py) and the best
``NUM_STAGES`` / launch settings (kernels/token_logprobs.py), with the numbers behind them.
Writes ``kernel_sweep_<device>_<time>.json/.md`` under ``--out``.

On the CPU (``--device cpu``, Triton under TRITON_INTERPRET=1) it runs tiny cases: a rehearsal
of the code path, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from bench import common, report

IGNORE_INDEX = -100
GPU_SWEEP_CASES = [(8, 1024, 128256, "bf16"), (8, 1024, 50257, "bf16"), (8, 1024, 128256, "fp32")]
GPU_KIND_CASES = {"aligned/many_rows": (8, 1024, 128256), "unaligned/many_rows": (8, 1024, 50257),
                  "aligned/few_rows": (1, 64, 152064), "unaligned/few_rows": (1, 64, 50257)}
CPU_SWEEP_CASES = [(1, 4, 1000, "fp32"), (1, 4, 1001, "bf16")]
CPU_KIND_CASES = {"aligned/many_rows": (2, 8, 1024), "unaligned/many_rows": (2, 8, 1001),
                  "aligned/few_rows": (1, 2, 1024), "unaligned/few_rows": (1, 2, 1001)}
STAGES = (1, 2, 3)
SHAPES = ((2048, 4), (4096, 8), (8192, 16))


def make_case(seqs, time, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(seqs, time, vocab, device=device, generator=gen).mul_(2).to(dtype)
    labels = torch.randint(0, vocab, (seqs, time), device=device, generator=gen)
    labels[:, : time // 4] = IGNORE_INDEX
    return logits, labels


def bytes_moved(logits, labels):
    row = logits.shape[-1] * logits.element_size()
    kept = int((labels != IGNORE_INDEX).sum())
    return kept * row, kept * row + labels.numel() * row


def timed_ms(fn, device, repeats):
    if device.type == "cuda":
        import triton  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=25, rep=max(50, 10 * repeats), return_mode="median")
    return common.time_calls(fn, lambda: None, device, warmup=1, repeats=repeats)["median_ms"]


def sweep(cases, device, repeats, copy_gbs):
    from pyalign.kernels import token_logprobs as tk  # noqa: PLC0415

    rows = []
    for seqs, time, vocab, dtype_name in cases:
        logits, labels = make_case(seqs, time, vocab, common.DTYPES[dtype_name], device)
        fwd_bytes, bwd_bytes = bytes_moved(logits, labels)
        logp, norm = tk.triton_forward(logits, labels, IGNORE_INDEX)
        grad = torch.ones_like(logp)
        out = torch.empty_like(logits)
        for stages, (block_v, warps) in itertools.product(STAGES, SHAPES if device.type == "cuda" else SHAPES[:1]):
            settings = {"num_stages": stages, "block_v": block_v, "num_warps": warps}
            row = {"case": f"{seqs}x{time}x{vocab} {dtype_name}", **settings}
            try:
                fwd = timed_ms(functools.partial(tk._launch_forward, logits, labels, IGNORE_INDEX, **settings),
                               device, repeats)
                bwd = timed_ms(functools.partial(tk._launch_backward, logits, labels, norm, grad, IGNORE_INDEX, out,
                                                 **settings), device, repeats)
            except Exception as err:  # noqa: BLE001 - e.g. too much shared memory for one setting
                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                rows.append(row)
                continue
            row.update({"forward_ms": fwd, "backward_ms": bwd, "forward_gb_per_s": fwd_bytes / fwd / 1e6,
                        "backward_gb_per_s": bwd_bytes / bwd / 1e6,
                        "forward_frac_of_copy": fwd_bytes / fwd / 1e6 / copy_gbs,
                        "backward_frac_of_copy": bwd_bytes / bwd / 1e6 / copy_gbs})
            rows.append(row)
            print(f"  {row['case']} stages={stages} block_v={block_v} warps={warps}: "
                  f"fwd {fwd:.3f} ms ({row['forward_gb_per_s']:.0f} GB/s), bwd {bwd:.3f} ms "
                  f"({row['backward_gb_per_s']:.0f} GB/s)", file=sys.stderr, flush=True)
        logits = labels = out = None  # free this case's tensors before the next one
        common.release_memory(device)
    return rows


def kinds(cases, device, repeats, dtype):
    from pyalign.ops.backends import available_backends, cuda_logits_kind, get_backend  # noqa: PLC0415

    names = [b for b in ("triton", "cuda") if b in available_backends(device)]
    rows = []
    for kind, shape in cases.items():
        logits, labels = make_case(*shape, dtype, device)
        if device.type == "cuda":
            assert cuda_logits_kind(logits) == kind, (kind, cuda_logits_kind(logits))
        row = {"kind": kind, "shape": "x".join(map(str, shape)), "dtype": common.dtype_name(dtype)}
        out = torch.empty_like(logits)
        for name in names:
            backend = get_backend(name)
            logp, norm = backend.forward(logits, labels, IGNORE_INDEX)
            grad = torch.ones_like(logp)
            row[f"{name}_ms"] = (
                timed_ms(functools.partial(backend.forward, logits, labels, IGNORE_INDEX), device, repeats)
                + timed_ms(functools.partial(backend.backward, logits, labels, norm, grad, IGNORE_INDEX, out),
                           device, repeats))
        timed = {name: row[f"{name}_ms"] for name in names}
        row["faster"] = min(timed, key=timed.get) if timed else None
        rows.append(row)
        print(f"  {kind} {row['shape']}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in timed.items()),
              file=sys.stderr, flush=True)
    return rows


def suggestions(sweep_rows, kind_rows) -> dict:
    from pyalign.ops import backends  # noqa: PLC0415

    table = dict(backends.AUTO_CUDA)
    for row in kind_rows:
        # Keep the current choice unless the other kernel is faster by more than 3% (noise).
        current = table[row["kind"]]
        other = "cuda" if current == "triton" else "triton"
        if row.get(f"{other}_ms") and row.get(f"{current}_ms") and row[f"{other}_ms"] < 0.97 * row[f"{current}_ms"]:
            table[row["kind"]] = other
    best = {}
    for row in sweep_rows:
        if "forward_ms" not in row:
            continue
        key = (row["num_stages"], row["block_v"], row["num_warps"])
        best[key] = best.get(key, 0.0) + row["forward_ms"] + row["backward_ms"]
    winner = min(best, key=best.get) if best else None
    return {"AUTO_CUDA": table, "auto_line": "AUTO_CUDA = " + json.dumps(table) + "  # noqa: E501",
            "best_settings": None if winner is None else
            {"num_stages": winner[0], "block_v": winner[1], "num_warps": winner[2],
             "total_ms_over_sweep_cases": best[winner]}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    device = common.resolve_device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--device cpu runs Triton under its interpreter: set TRITON_INTERPRET=1")
    env = report.environment(device, "bench.kernel_sweep", sys.argv[1:] if argv is None else argv)
    copy = common.copy_bandwidth(device, (2048 if device.type == "cuda" else 64) * common.MIB)
    copy_gbs = copy["bytes_per_s"] / 1e9
    gpu = device.type == "cuda"
    sweep_rows = sweep(GPU_SWEEP_CASES if gpu else CPU_SWEEP_CASES, device, args.repeats, copy_gbs)
    kind_rows = kinds(GPU_KIND_CASES if gpu else CPU_KIND_CASES, device, args.repeats, torch.bfloat16)
    payload = {"benchmark": "kernel_sweep", "environment": env, "copy": copy, "sweep": sweep_rows,
               "kinds": kind_rows, "suggested": suggestions(sweep_rows, kind_rows)}
    stem = report.result_stem("kernel_sweep", device, env["timestamp_utc"])
    columns = [("case", "case", ""), ("stages", "num_stages", ""), ("block_v", "block_v", ""),
               ("warps", "num_warps", ""), ("fwd ms", "forward_ms", ".3f"), ("bwd ms", "backward_ms", ".3f"),
               ("fwd GB/s", "forward_gb_per_s", ".0f"), ("bwd GB/s", "backward_gb_per_s", ".0f"),
               ("fwd / copy", "forward_frac_of_copy", ".2f"), ("bwd / copy", "backward_frac_of_copy", ".2f"),
               ("skipped", "skipped", "")]
    kind_columns = [("kind", "kind", ""), ("shape", "shape", ""), ("triton fwd+bwd ms", "triton_ms", ".3f"),
                    ("cuda fwd+bwd ms", "cuda_ms", ".3f"), ("faster", "faster", "")]
    markdown = "\n".join([
        f"# Triton launch settings and auto choice: {env['device']}", "", f"`{env['command']}`  ",
        report.versions_line(env), f"copy bandwidth {copy_gbs:.0f} GB/s (read + write)", "",
        report.markdown_table(sweep_rows, columns), "", report.markdown_table(kind_rows, kind_columns), "",
        f"suggested: `{payload['suggested']['auto_line']}`; best settings {payload['suggested']['best_settings']}",
    ])
    paths = report.write_outputs(args.out, stem, payload, markdown, None)
    print(markdown)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return payload


if __name__ == "__main__":
    main()
