"""What every demo command shares: its command line (``--quick``, ``--out``, ``--config``,
``--threads``), the YAML file of overrides, logging, torch threads and the per-phase clock. The
demos (:mod:`pyalign.demo.spo_markers`, :mod:`pyalign.demo.spo_alpha_sweep`,
:mod:`pyalign.demo.dpa`) differ only in their settings and their run function."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("pyalign.demo")


def read_overrides(config: str | None) -> dict:
    """The settings a ``--config`` YAML file overrides ({} without a file)."""
    if not config:
        return {}
    import yaml  # noqa: PLC0415

    with open(config, encoding="utf-8") as handle:
        overrides = yaml.safe_load(handle) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{config}: expected a mapping of settings")
    return overrides


class Clock:
    """Wall and CPU seconds per phase (CPU time tells a busy shared machine from slow code); a
    phase timed several times adds up."""

    def __init__(self):
        self.started = time.perf_counter()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = self.started, time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[name] = round(self.wall.get(name, 0.0) + wall - self._wall, 1)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + cpu - self._cpu, 1)
        self._wall, self._cpu = wall, cpu
        log.info("%s: %.1f s wall, %.1f s CPU so far", name, self.wall[name], self.cpu[name])

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def summary(self) -> dict:
        return {"wall_s": dict(self.wall), "cpu_s": {**self.cpu, "process_total": round(time.process_time(), 1)},
                "torch_threads": torch.get_num_threads()}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_threads(threads: int | None, model: str) -> int:
    """torch CPU threads for the run (the tiny model runs best on one: its ops are too small to
    split); returns the previous count."""
    previous = torch.get_num_threads()
    chosen = threads or (1 if model == "tiny" else None)
    if chosen:
        torch.set_num_threads(chosen)
    return previous


def demo_main(argv, *, prog: str, description: str, default_out: str,
              settings_for: Callable[[bool, str | None], dict], run: Callable[[dict, Path], Path]) -> int:
    """Parse the demo's command line, run it with its settings (``settings_for(quick, config)``)
    into ``--out`` (default ``default_out``, ``_quick`` appended for ``--quick``) and print the
    results JSON's path as the last line."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, seconds (for tests)")
    parser.add_argument("--out", default=None, help=f"output folder (default {default_out}[_quick])")
    parser.add_argument("--config", default=None, help="YAML overriding the built-in settings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    configure_logging()
    settings = settings_for(args.quick, args.config)
    out = Path(args.out or (f"{default_out}_quick" if args.quick else default_out))
    previous = set_threads(args.threads, settings["model"])
    try:
        json_path = run(settings, out)
    finally:
        torch.set_num_threads(previous)
    print(json_path)  # last line: the results JSON
    return 0
