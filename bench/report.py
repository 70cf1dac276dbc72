"""The record of a run: environment (device, versions, command), markdown tables and the result
files (JSON, markdown, PNG) named by benchmark, device and date."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {cpu_vector_info()['pyalign_cpu_kernel'] or 'no'} kernel ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        name = name.replace("NVIDIA", "").strip()
    else:
        name = f"cpu-{_cpu_model()}-{cpu_vector_info()['pyalign_cpu_kernel'] or 'nokernel'}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_vector_info() -> dict:
    """The CPU's widest vector ISA, ATen's chosen capability and pyalign's kernel variant: a CPU
    number means little without them (AVX2 and AVX-512 machines differ by up to 2x)."""
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    try:
        from pyalign.ops.backends import native_module  # noqa: PLC0415

        kernel = native_module().cpu_capability()
    except Exception:  # noqa: BLE001 - the extension may be missing in a bare checkout
        kernel = None
    return {"cpu_isa": isa, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pyalign_cpu_kernel": kernel, "cpu_count": os.cpu_count()}


def versions_line(env: dict, *packages: str) -> str:
    """The provenance line of a results table: time, versions, CPU vector ISA, commit."""
    parts = [f"torch {env['torch']}", f"triton {env['triton']}", f"CUDA {env['torch_cuda']}"]
    parts += [f"{name.replace('_', '-')} {env.get(name)}" for name in packages]
    if env.get("device_type") == "cpu":
        parts.append(f"CPU {env.get('cpu_isa')}, pyalign kernel {env.get('pyalign_cpu_kernel')}, "
                     f"{env.get('torch_threads')} threads, load average {_load(env)}")
    if env.get("env"):
        parts.append(" ".join(f"{k}={v}" for k, v in env["env"].items()))
    dirty = " (dirty)" if env["git_dirty"] else ""
    return f"{env['timestamp_utc']}; {', '.join(parts)}; commit {env['git_commit']}{dirty}  "


def _load(env: dict) -> str:
    load = env.get("load_average")
    return "-" if not load else "/".join(f"{x:.1f}" for x in load)


def environment(device: torch.device, module: str, argv: Sequence[str]) -> dict:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "command": " ".join(["python", "-m", module, *argv]),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "pyalign": package_version("pyalign"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }
    # Settings that change CPU timings: threads, the kernel variant, and how big tensors get memory
    # (THP_MEM_ALLOC_ENABLE=1: torch backs tensors >= 2 MiB with 2 MiB pages; see bench/NOTES.md).
    info["env"] = {name: os.environ.get(name) for name in (
        "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES",
        "PYALIGN_BACKEND", "TRITON_INTERPRET") if os.environ.get(name) is not None}
    if device.type == "cpu":
        info.update(cpu_vector_info())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu_memory_bytes": props.total_memory,
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
        })
    return info


# --------------------------------------------------------------------------- output


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (header, key, format spec); a missing or None value prints as '-'."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif isinstance(value, float) and spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_stem(kind: str, device: torch.device, timestamp_utc: str) -> str:
    """``logprobs_h100-80gb-hbm3_2026-11-22T1041`` (kind, device, UTC date and time)."""
    stamp = timestamp_utc.replace(":", "")[:15]  # 2026-11-22T1041
    return f"{kind}_{device_slug(device)}_{stamp}"


def write_outputs(out_dir: Path, stem: str, payload: dict, markdown: str,
                  plot: Callable[[Path], None] | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths[1].write_text(markdown + "\n")
    if plot is not None:
        png = out_dir / f"{stem}.png"
        try:
            plot(png)
            paths.append(png)
        except Exception as err:  # the numbers matter more than the picture
            print(f"note: no chart written ({err!r})", file=sys.stderr)
    return paths
