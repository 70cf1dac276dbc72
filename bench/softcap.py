"""What the logit transforms cost in the fused op (issue 17 item 4): ``pyalign.token_logprobs`` on
``[N, V]`` logits without a transform, with ``logit_scale`` (Cohere, Granite) and with ``softcap``
(Gemma 2/3), on the CPU kernel, in one process.

    flock /tmp/pyalign-cpu.lock python -m bench.softcap --threads 2
    flock /tmp/pyalign-cpu.lock python -m bench.softcap --threads 1

Per shape and transform, timed in interleaved rounds (a load that drifts hits every variant alike):

- ``forward``: the op without autograd (one read of the logits);
- ``fwd+bwd``: the op and ``.sum().backward()``, the gradient a fresh tensor as in training (with
  ``THP_MEM_ALLOC_ENABLE=1``, as the ``pyalign`` command sets it, it costs about a zeroing of it);
- ``kernel fwd`` / ``kernel bwd``: the backend's forward and its backward into a buffer allocated
  once: the transform's own cost (one read; one read and one write), without allocation.

Each variant's log-probs on 16 rows are checked against the float64 reference. Results go to
``bench/results/softcap_<cpu>-<threads>t_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from bench import common, report

VARIANTS = {"none": (1.0, None), "logit_scale=0.0625": (0.0625, None), "softcap=30": (1.0, 30.0)}
DEFAULT_SHAPES = "4096x49152,1024x256000"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.softcap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxV (rows x vocabulary)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def _check_values(logits, labels, logit_scale, softcap) -> float:
    """Largest |log p - reference| over the first 16 rows."""
    from pyalign.reference import reference_token_logprobs  # noqa: PLC0415

    import pyalign  # noqa: PLC0415

    rows = slice(0, 16)
    with torch.no_grad():
        ours = pyalign.token_logprobs(logits[rows], labels[rows], logit_scale=logit_scale, softcap=softcap)
    ref = reference_token_logprobs(logits[rows], labels[rows], logit_scale=logit_scale, softcap=softcap)
    return float((ours.double() - ref).abs().max())


def run_shape(rows: int, vocab: int, args) -> list[dict]:
    import pyalign  # noqa: PLC0415
    from pyalign.ops.backends import get_backend  # noqa: PLC0415

    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    # std 4 (a trained model's logits): with softcap=30 most logits stay on tanh's slope
    logits = torch.randn(rows, vocab, generator=gen) * 4
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    leaf = logits.clone().requires_grad_()
    backend = get_backend("cpu")
    x3, labels2 = logits.view(1, rows, vocab), labels.view(1, rows)
    out = torch.empty_like(x3)
    nothing = lambda: None  # noqa: E731

    def forward(scale, cap):
        with torch.no_grad():
            return pyalign.token_logprobs(logits, labels, logit_scale=scale, softcap=cap)

    def forward_backward(scale, cap):
        leaf.grad = None
        pyalign.token_logprobs(leaf, labels, logit_scale=scale, softcap=cap).sum().backward()

    entries, names = [], []
    for variant, (scale, cap) in VARIANTS.items():
        _, norm = backend.forward(x3, labels2, -100, scale, cap)
        grad2 = torch.ones(1, rows)
        for measure, call in (
            ("forward", functools.partial(forward, scale, cap)),
            ("fwd+bwd", functools.partial(forward_backward, scale, cap)),
            ("kernel fwd", functools.partial(backend.forward, x3, labels2, -100, scale, cap)),
            ("kernel bwd", functools.partial(backend.backward, x3, labels2, norm, grad2, -100, out, scale, cap)),
        ):
            common.warm_up(call, nothing, device, args.warmup)
            entries.append((call, nothing))
            names.append((variant, measure))
    timed = common.time_interleaved(entries, device, args.repeats)
    by_variant: dict[str, dict] = {}
    for (variant, measure), result in zip(names, timed):
        row = by_variant.setdefault(variant, {"shape": f"{rows}x{vocab}", "variant": variant})
        row[measure] = result["median_ms"]
        row[f"{measure} iqr"] = result["iqr_ms"]
        row[f"{measure} times"] = result["times_ms"]
    base = by_variant["none"]
    for variant, row in by_variant.items():
        for measure in ("forward", "fwd+bwd", "kernel fwd", "kernel bwd"):
            row[f"{measure} x"] = row[measure] / base[measure]
        row["max_abs_err_vs_float64"] = _check_values(logits, labels, *VARIANTS[variant])
        print(f"  {row['shape']} {variant:>18}: forward {row['forward']:8.1f} ms ({row['forward x']:.2f}x), "
              f"fwd+bwd {row['fwd+bwd']:8.1f} ms ({row['fwd+bwd x']:.2f}x), kernel fwd {row['kernel fwd']:7.1f} ms "
              f"({row['kernel fwd x']:.2f}x), kernel bwd {row['kernel bwd']:7.1f} ms ({row['kernel bwd x']:.2f}x)",
              file=sys.stderr, flush=True)
    return list(by_variant.values())


COLUMNS = [("shape", "shape", ""), ("transform", "variant", ""),
           ("forward ms", "forward", ".1f"), ("x none", "forward x", ".2f"),
           ("fwd+bwd ms", "fwd+bwd", ".1f"), ("x none", "fwd+bwd x", ".2f"),
           ("kernel fwd ms", "kernel fwd", ".1f"), ("x none", "kernel fwd x", ".2f"),
           ("kernel bwd ms", "kernel bwd", ".1f"), ("x none", "kernel bwd x", ".2f"),
           ("max err vs fp64", "max_abs_err_vs_float64", ".1e")]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = report.environment(device, "bench.softcap", argv)
    shapes = common.parse_shapes(args.shapes, 2)
    rows = []
    for n, v in shapes:
        rows.extend(run_shape(n, v, args))
        common.release_memory(device)
    payload = {"environment": env, "settings": vars(args) | {"out": str(args.out)}, "rows": rows}
    markdown = (f"# pyalign.token_logprobs with logit transforms, fp32, CPU\n\n{env['device']}; command: "
                f"`{env['command']}`; ISA {env.get('cpu_isa')}, ATen {env.get('aten_cpu_capability')}, kernel "
                f"{env.get('pyalign_cpu_kernel')}, {env['torch_threads']} threads; THP_MEM_ALLOC_ENABLE="
                f"{env['env'].get('THP_MEM_ALLOC_ENABLE', 'unset')}; load average {report._load(env)}; median of "
                f"{args.repeats} interleaved rounds.\n\n" + report.markdown_table(rows, COLUMNS))
    stem = report.result_stem("softcap", device, env["timestamp_utc"])
    for path in report.write_outputs(args.out, stem, payload, markdown, None):
        print(path)
    return payload


if __name__ == "__main__":
    main()
