"""Short tables and target checks from benchmark JSON files.

    python -m bench.summary bench/results/logprobs_*.json bench/results/linear_*.json

Targets (SPEC section 4, issues 2-4 and 12):
- logits, CPU: the cpu backend at least 2x faster than eager fp32, nothing logits-sized beyond
  the gradient (checked as: extra memory beyond the gradient <= 1% of the logits); the C++
  kernel alone (forward + backward into a gradient buffer allocated once) within 2x of the
  3-pass copy floor;
- logits, CUDA: pyalign's triton and cuda backends within 1.25x of the 3-pass floor, extra
  memory beyond the gradient <= 1% of the logits;
- linear, CUDA: pyalign's default mode faster than every other method timed, extra memory beyond
  the gradients <= 0.6 GiB (default) and <= 64 MiB (low_memory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _logprobs_checks(case: dict, device_type: str) -> list[str]:
    rows = {r["method"]: r for r in case["methods"] if "median_ms" in r}
    checks = []
    for kernel in case.get("kernels", []):
        if "x_floor" not in kernel:
            continue
        if device_type == "cpu":
            ratio = kernel.get("x_copy", kernel["x_floor"])  # against the copy timed alongside
            ok = ratio <= 2
            checks.append(f"{'MET ' if ok else 'MISS'} {kernel['backend']} kernel alone: forward + backward "
                          f"{kernel['total_ms']:.1f} ms = {ratio:.2f}x the 3-pass copy floor timed alongside "
                          f"({kernel['x_floor']:.2f}x the run's floor) (target <= 2)")
        else:
            checks.append(f"info {kernel['backend']} kernel alone: {kernel['x_floor']:.2f}x floor; forward "
                          f"{kernel['forward_gb_per_s']:.0f} GB/s, backward {kernel['backward_gb_per_s']:.0f} GB/s "
                          f"(copy {kernel['copy_gb_per_s']:.0f} GB/s)")
    if device_type == "cpu":
        row = rows.get("pyalign[cpu]")
        if row and row.get("speedup_vs_eager") is not None:
            frac = row["extra_beyond_grad_frac_of_logits"]
            ok = row["speedup_vs_eager"] >= 2 and frac <= 0.01
            checks.append(f"{'MET ' if ok else 'MISS'} pyalign[cpu]: {row['speedup_vs_eager']:.2f}x eager "
                          f"(target >= 2), extra beyond grad {frac:.2%} of the logits (target <= 1%)")
        return checks
    for name in ("pyalign[triton]", "pyalign[cuda]", "pyalign[triton]+inplace", "pyalign[cuda]+inplace"):
        row = rows.get(name)
        if not row:
            continue
        frac = row["extra_beyond_grad_frac_of_logits"]
        ok = row["x_floor"] <= 1.25 and frac <= 0.01
        checks.append(f"{'MET ' if ok else 'MISS'} {name}: {row['x_floor']:.2f}x floor (target <= 1.25), "
                      f"extra beyond grad {frac:.2%} of the logits (target <= 1%)")
    return checks


def _linear_checks(case: dict) -> list[str]:
    rows = [r for r in case["methods"] if "median_ms" in r]
    checks = []
    for mode, limit in (("default", 0.6 * GIB), ("low_memory", 64 * 2**20)):
        ours = [r for r in rows if r["method"].startswith("pyalign") and f"[{mode}" in r["method"]]
        others = [r for r in rows if not r["method"].startswith("pyalign")]
        for row in ours:
            extra = row["peak_extra_bytes"] - row["grad_bytes"]
            faster = all(row["median_ms"] < other["median_ms"] for other in others)
            ok = extra <= limit and (faster or mode == "low_memory")
            fastest_other = min(others, key=lambda r: r["median_ms"], default=None)
            versus = (f", fastest other {fastest_other['method']} {fastest_other['median_ms']:.2f} ms"
                      if fastest_other else "")
            checks.append(f"{'MET ' if ok else 'MISS'} {row['method']}: {row['median_ms']:.2f} ms{versus}; "
                          f"extra beyond grads {extra / GIB:.3f} GiB (target <= {limit / GIB:.3f})")
    return checks


def summarize(path: Path) -> str:
    payload = json.loads(path.read_text())
    env = payload["environment"]
    lines = [f"# {payload['benchmark']} on {env['device']} ({path.name})", f"  {env['command']}"]
    for case in payload["cases"]:
        lines.append(f"  {case['label']}: floor {case['floor_ms']:.3f} ms")
        lines.append(f"    {'method':44s} {'median ms':>10s} {'x floor':>8s} {'extra GiB':>10s} "
                     f"{'beyond grad':>11s} {'rel err':>8s}")
        for row in case["methods"]:
            if "median_ms" not in row:
                lines.append(f"    {row['method']:44s} skipped: {row.get('skipped', '')[:70]}")
                continue
            rel = row.get("grad_rel_err", row.get("grad_hidden_rel_err"))
            lines.append(
                f"    {row['method']:44s} {row['median_ms']:10.3f} {_fmt(row.get('x_floor'), '8.2f')} "
                f"{row['peak_extra_gib']:10.3f} {row['extra_beyond_grad_gib']:11.3f} {_fmt(rel, '8.1e')}")
        checks = (_logprobs_checks(case, env["device_type"]) if payload["benchmark"] == "logprobs"
                  else _linear_checks(case) if env["device_type"] == "cuda" else [])
        lines += [f"    {check}" for check in checks]
    return "\n".join(lines)


def main(argv=None) -> None:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        raise SystemExit("usage: python -m bench.summary RESULT.json [...]")
    for path in paths:
        print(summarize(path))


if __name__ == "__main__":
    main()
