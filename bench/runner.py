"""The driver the benchmarks share (bench.logprobs, bench.linear): the run over shapes x dtypes
that prints a table per case and rewrites the result files after each one, the per-case loop that
checks, measures and then times the methods, and the guards around one method's preparation.

What differs between the benchmarks (arguments, inputs, the float64 reference, the methods, the
hardware ceiling, columns, markdown) stays in their own modules and comes in as functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench import common, report
from bench.methods import BETA, IGNORE_INDEX, Method
from bench.plot import plot_cases

# (run_once, before_each): a prepared method, ready to time.
TimedEntry = tuple[Callable[[], object], Callable[[], None]]


def finish_args(parser: argparse.ArgumentParser, argv: Sequence[str],
                defaults: dict[str, dict]) -> tuple[argparse.Namespace, torch.device]:
    """Parse ``argv``, resolve ``--device`` and fill the arguments left unset from ``defaults``
    for that device type (``defaults[device.type]``: argument name -> value)."""
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    for key, value in defaults[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args, device


def with_status(rows: Sequence[dict]) -> list[dict]:
    """The rows with a ``status`` column: why a method was skipped, else its note."""
    return [{**r, "status": r.get("skipped") or r.get("note") or ""} for r in rows]


def run_benchmark(
    name: str,
    argv: Sequence[str] | None,
    *,
    parse_args: Callable[[list[str]], tuple[argparse.Namespace, torch.device]],
    shape_rank: int,
    measure_ceilings: Callable[[argparse.Namespace, torch.device, list[torch.dtype]], dict],
    run_case: Callable[..., dict],
    columns: Sequence[tuple[str, str, str]],
    render_markdown: Callable[[dict], str],
    title: str,
) -> dict:
    """Run benchmark ``name`` (module ``bench.<name>``, result files ``<name>_<device>_<time>``)
    on the command line ``argv`` (default: ``sys.argv[1:]``) and return its payload.

    ``measure_ceilings(args, device, dtypes)`` gives the payload's ``ceilings``;
    ``run_case(shape, dtype, device, methods_filter, args, ceilings)`` one entry of its ``cases``.
    ``title`` heads the chart, followed by the device name.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    try:
        with common.collections_skip_existing_objects():
            return _run(name, argv, parse_args, shape_rank, measure_ceilings, run_case, columns,
                        render_markdown, title)
    finally:
        torch.set_num_threads(threads)  # --threads must not outlive the call (tests share a process)


def _run(name, argv, parse_args, shape_rank, measure_ceilings, run_case, columns, render_markdown,
         title) -> dict:
    args, device = parse_args(argv)
    common.set_threads(args.threads)
    shapes = common.parse_shapes(args.shapes, rank=shape_rank)
    dtypes = common.parse_dtypes(args.dtypes)
    methods_filter = [m.strip() for m in args.methods.split(",") if m.strip()]
    env = report.environment(device, f"bench.{name}", argv)
    ceilings = measure_ceilings(args, device, dtypes)
    payload = {
        "benchmark": name, "environment": env,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "logit_std": args.logit_std,
                     "seed": args.seed, "beta": BETA, "ignore_index": IGNORE_INDEX,
                     "labels_ignored": "first quarter of positions",
                     "loss": "DPO sigmoid, 4 pairs, chosen rows first"},
        "ceilings": ceilings,
        "memory_tracker": common.verify_cpu_tracker() if device.type == "cpu" else
        {"ok": True, "tracker": "torch.cuda.max_memory_allocated"},
        "cases": [],
    }
    stem = report.result_stem(name, device, env["timestamp_utc"])
    chart_title = f"{title}, {env['device']}"
    paths: list[Path] = []
    for shape in shapes:
        for dtype in dtypes:
            case = run_case(shape, dtype, device, methods_filter, args, ceilings)
            payload["cases"].append(case)
            print(f"\n## {case['label']}  floor {case['floor_ms']:.3f} ms")
            print(report.markdown_table(with_status(case["methods"]), columns), flush=True)
            # Written after every case, so that a run cut off by a time limit keeps what it did.
            paths = report.write_outputs(args.out, stem, payload, render_markdown(payload),
                                         lambda path: plot_cases(payload["cases"], path, chart_title))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return payload


def check_and_time_methods(methods: Sequence[Method],
                           prepare: Callable[[Method], tuple[dict, TimedEntry | None]],
                           device: torch.device, repeats: int, label: str) -> list[dict]:
    """One result row per method: ``prepare(method)`` checks it, measures its memory and warms it
    up (returning its row and, unless it was skipped, what to time); then all the prepared methods
    are timed together, ``repeats`` interleaved rounds."""
    rows, timed = [], []
    for method in methods:
        print(f"  {label}: {method.name} ...", file=sys.stderr, flush=True)
        row, entry = prepare(method)
        rows.append(row)
        if entry is not None:
            timed.append((row, entry))
    print(f"  {label}: timing {len(timed)} methods, {repeats} rounds", file=sys.stderr, flush=True)
    try:
        stats = common.time_interleaved([entry for _, entry in timed], device, repeats)
        for (row, _), numbers in zip(timed, stats):
            row.update(numbers)
    except Exception as err:  # e.g. out of memory through fragmentation while interleaving
        for row, _ in timed:
            row["skipped"] = f"failed while timing: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return rows


def guarded_prepare(method: Method, device: torch.device, need_bytes: int,
                    check: Callable[[dict], TimedEntry]) -> tuple[dict, TimedEntry | None]:
    """A method's result row and, when it can be timed, its ``(run_once, before_each)``.

    Skipped with the reason in the row: a method whose library is missing (no loss function), one
    that would need more than ``need_bytes`` beyond the inputs of the memory now free, and one that
    fails or runs out of memory in ``check(row)``, which runs it, fills ``row`` with its errors
    and peak memory, warms it up and returns what to time.
    """
    row: dict = {"method": method.name}
    if method.loss is None:
        row["skipped"] = method.note
        return row, None
    if method.note:
        row["note"] = method.note
    free = common.free_memory_bytes(device)
    if need_bytes > free:
        row["skipped"] = (f"would need ~{need_bytes / common.GIB:.1f} GiB beyond the inputs, "
                          f"{free / common.GIB:.1f} GiB free")
        return row, None
    try:
        return row, check(row)
    except torch.cuda.OutOfMemoryError as err:
        row["skipped"] = f"out of memory: {str(err).splitlines()[0][:200]}"
    except Exception as err:  # one broken method must not lose the others' numbers
        message = str(err).splitlines()[0][:300] if str(err) else ""
        row["skipped"] = f"failed: {type(err).__name__}: {message}"
    finally:
        common.release_memory(device)
    return row, None
