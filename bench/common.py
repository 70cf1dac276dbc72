"""Measurement machinery shared by the benchmarks: timing, peak memory, the two hardware ceilings
(copy bandwidth, matmul rate), the environment record and the result files.

Conventions (see bench/NOTES.md):
- A method is a callable ``run_once() -> tuple of gradients`` doing forward + backward. Inputs are
  allocated before it runs; "peak extra" is the highest memory in use while it runs minus what was
  in use before (the inputs), the gradients it returns included.
- Timing: warm-up calls, then ``repeats`` timed calls; median, min and inter-quartile range.
  CUDA: events around each call, synchronised after it. CPU: ``time.perf_counter``.
- Memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  Memory, CPU: the profiler's allocation events (every tensor the c10 allocator hands out or takes
  back, any thread that runs with the profiler on) summed in time order to a running peak; checked
  against a known allocation by :func:`verify_cpu_tracker`. The process's resident-set high-water
  mark (``/proc/self/clear_refs`` + ``VmHWM``), which also sees memory not allocated through torch,
  is recorded beside it where the kernel lets us reset it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

GIB = 2**30
MIB = 2**20
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- arguments


def parse_shapes(text: str, rank: int) -> list[tuple[int, ...]]:
    """``"8x256x32000,8x1024x32000"`` -> [(8, 256, 32000), (8, 1024, 32000)]."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != rank or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: expected {rank} positive integers joined by 'x', got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise ValueError("--shapes: no shape given")
    return shapes


def parse_dtypes(text: str) -> list[torch.dtype]:
    dtypes = []
    for item in text.split(","):
        item = item.strip().lower()
        if item not in DTYPES:
            raise ValueError(f"--dtypes: expected names from {sorted(DTYPES)}, got {item!r}")
        dtypes.append(DTYPES[item])
    return dtypes


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_ms: Sequence[float]) -> dict:
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "repeats": len(ordered),
        "times_ms": list(times_ms),
    }


def _timed_call(run_once: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = run_once()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    result = run_once()
    elapsed = (time.perf_counter() - start_s) * 1e3
    del result
    return elapsed


def warm_up(run_once: Callable[[], object], before_each: Callable[[], None],
            device: torch.device, calls: int) -> None:
    for _ in range(calls):
        before_each()
        result = run_once()
        del result
    synchronize(device)


def time_calls(
    run_once: Callable[[], object],
    before_each: Callable[[], None],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict:
    """Median (and min, IQR) of ``repeats`` timed calls after ``warmup`` untimed ones.

    ``before_each`` (e.g. restoring logits that a method overwrote) runs outside the timed region.
    """
    warm_up(run_once, before_each, device, warmup)
    times = []
    for _ in range(repeats):
        before_each()
        times.append(_timed_call(run_once, device))
    return summarize(times)


def minor_page_faults() -> int:
    """Minor page faults of this process so far (first touches of freshly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(
    entries: Sequence[tuple[Callable[[], object], Callable[[], None]]],
    device: torch.device,
    repeats: int,
) -> list[dict]:
    """Time several already warmed-up ``(run_once, before_each)`` in rounds: one call of each per
    round, so that a load that drifts over time (a shared machine) hits every method alike.

    On the CPU each row also gets ``minor_faults_per_call`` (median over the timed calls): a method
    that returns a freshly allocated gradient pays one fault per 4 KiB page of it on every call
    when the allocator hands the memory back to the kernel on free (glibc does, above 32 MiB)."""
    times: list[list[float]] = [[] for _ in entries]
    faults: list[list[int]] = [[] for _ in entries]
    for _ in range(repeats):
        for slot, (run_once, before_each) in enumerate(entries):
            before_each()
            before = minor_page_faults()
            times[slot].append(_timed_call(run_once, device))
            faults[slot].append(minor_page_faults() - before)
    results = [summarize(t) for t in times]
    if device.type == "cpu":
        for result, counts in zip(results, faults):
            result["minor_faults_per_call"] = int(statistics.median(counts))
    return results


# --------------------------------------------------------------------------- memory


def _is_cpu_event(event) -> bool:
    return str(event.device_type()).upper().endswith("CPU")


def cpu_tensor_peak(run_once: Callable[[], object]) -> tuple[int, object]:
    """Peak bytes of live CPU tensor allocations made while ``run_once`` runs, and its result.

    Allocation (+bytes) and free (-bytes) events from the profiler are sorted by time and summed
    to a running total whose maximum is the peak. The caller collects garbage first, so that no
    block allocated before the call is freed during it (that would lower the total).
    """
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run_once()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and _is_cpu_event(event)
    ]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak, result


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1)) * 1024


def rss_peak(run_once: Callable[[], object]) -> tuple[int | None, object]:
    """Resident-set high-water mark above the resident set before the call (None if the kernel
    does not let this process reset its high-water mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size to the current one
        before = _proc_status_bytes("VmRSS")
    except OSError:
        return None, run_once()
    result = run_once()
    return max(0, _proc_status_bytes("VmHWM") - before), result


def verify_cpu_tracker() -> dict:
    """Check that :func:`cpu_tensor_peak` sees a known 32 MiB allocation (and nothing much else)."""
    size = 32 * MIB

    def allocate():
        block = torch.empty(size // 4, dtype=torch.float32)
        block.fill_(1.0)  # touch the pages, so that the resident-set check sees them too
        return float(block[-1])

    try:
        peak, _ = cpu_tensor_peak(allocate)
    except Exception as err:  # a profiler without allocation events: say so, do not crash
        return {"ok": False, "expected_bytes": size, "seen_bytes": None, "error": repr(err)}
    rss, _ = rss_peak(allocate)
    return {
        "ok": size <= peak <= size + MIB,
        "expected_bytes": size,
        "seen_bytes": peak,
        "rss_seen_bytes": rss,
    }


def _grad_bytes(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of the returned gradients that live in new storage (not in an input's storage)."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen, total = set(), 0
    for grad in grads:
        if grad is None:
            continue
        ptr = grad.untyped_storage().data_ptr()
        if ptr in input_ptrs or ptr in seen:
            continue
        seen.add(ptr)
        total += grad.untyped_storage().nbytes()
    return total


def measure_peak(
    run_once: Callable[[], Sequence[torch.Tensor]],
    before: Callable[[], None],
    device: torch.device,
    inputs: Sequence[torch.Tensor],
) -> dict:
    """Peak memory above the inputs during one forward + backward, gradients included, and how
    much of it is the gradients themselves (``grad_bytes``; 0 when written into an input)."""
    before()
    gc.collect()
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        grads = run_once()
        torch.cuda.synchronize(device)
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["tracker"] = "torch.cuda.max_memory_allocated"
    else:
        peak, grads = cpu_tensor_peak(run_once)
        out["peak_extra_bytes"] = peak
        out["tracker"] = "torch.profiler allocation events"
    out["grad_bytes"] = _grad_bytes(grads, inputs)
    del grads
    if device.type == "cpu":
        before()
        rss, grads = rss_peak(run_once)
        out["rss_peak_extra_bytes"] = rss
        del grads
    out["peak_extra_gib"] = out["peak_extra_bytes"] / GIB
    out["grad_gib"] = out["grad_bytes"] / GIB
    out["extra_beyond_grad_gib"] = (out["peak_extra_bytes"] - out["grad_bytes"]) / GIB
    return out


@contextlib.contextmanager
def collections_skip_existing_objects():
    """Freeze the objects alive now (modules, ...) out of the garbage collector's scans, so that
    the collections run between methods take milliseconds instead of a third of a second."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_memory_bytes(device: torch.device) -> int:
    """Memory a method could still allocate: free device memory (after returning the caching
    allocator's unused blocks), or the system's available memory for the CPU."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    import psutil  # noqa: PLC0415

    return psutil.virtual_memory().available


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- ceilings


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict:
    """Bytes read + written per second by a large same-device copy (median of ``repeats``)."""
    elements = nbytes // 4
    source = torch.empty(elements, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    stats = time_calls(lambda: target.copy_(source), lambda: None, device, warmup=2, repeats=repeats)
    moved = 2 * elements * 4
    source = target = None  # free both before the caching allocator is emptied
    release_memory(device)
    return {
        "bytes_per_copy": moved,
        "median_ms": stats["median_ms"],
        "bytes_per_s": moved / (stats["median_ms"] * 1e-3),
    }


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> dict:
    """FLOP/s of a square ``size``^3 matrix product on random data (median of ``repeats``)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    stats = time_calls(lambda: a @ b, lambda: None, device, warmup=2, repeats=repeats)
    flops = 2 * size**3
    a = b = None
    release_memory(device)
    return {"size": size, "dtype": dtype_name(dtype), "median_ms": stats["median_ms"],
            "flop_per_s": flops / (stats["median_ms"] * 1e-3)}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
