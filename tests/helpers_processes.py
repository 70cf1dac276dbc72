"""Real multi-process runs for tests: a free TCP port on 127.0.0.1 and ``run_gloo``, which runs one
scenario function in N spawned processes joined by a gloo process group and returns their results
by rank (a hang guard kills them and fails the test instead of waiting forever)."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyalign import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, scenario, args: tuple, env: dict,
           collective_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **env)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=collective_timeout_s))
    torch.set_num_threads(1)
    finished = False
    try:
        result = scenario(rank, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        finished = True
    finally:
        distributed.shutdown(wait_for_others=finished)


def run_gloo(tmp_path: Path, scenario, *args, world: int = 2, join_timeout_s: float = 150,
             collective_timeout_s: float = 60, env: dict | None = None) -> list:
    """``scenario(rank, *args)`` (a module-level function: the spawned processes import it) in
    ``world`` gloo processes, one thread each; their results, by rank."""
    context = mp.start_processes(
        _entry, args=(world, free_port(), str(tmp_path), scenario, args, dict(env or {}), collective_timeout_s),
        nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + join_timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{getattr(scenario, '__name__', scenario)}: the {world} gloo processes did not finish "
                        f"within {join_timeout_s} s (a collective waiting forever?)")
    return [torch.load(Path(tmp_path) / f"{rank}.pt") for rank in range(world)]
