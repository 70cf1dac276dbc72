"""``python tests/helpers_paused_run.py CONFIG MARKER PAUSE_STEP [PAUSE_RANK]``: ``pyalign train CONFIG``
(the real command line, in this process) whose SFT trainer, after optimizer step PAUSE_STEP on process
PAUSE_RANK, writes its pid to MARKER and waits (up to 120 s) for a stop signal, so a test can signal it
at a known step, or find the run's output folder locked. Exits with ``pyalign``'s status.

:func:`start` launches it, :func:`wait_for` waits until it is paused and returns its pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def start(config: Path, marker: Path, step: int, *, rank: int = 0, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "helpers_paused_run.py"), str(config), str(marker), str(step),
                             str(rank)], env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(marker: Path, processes: list[subprocess.Popen], timeout: float = 240) -> int:
    """The pid in ``marker`` once a process wrote it; fails the test if they all end or time runs out."""
    import pytest  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not marker.is_file() or not marker.read_text():
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"the run ended before pausing: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            for process in processes:
                process.kill()
            pytest.fail("the run did not reach the step")
        time.sleep(0.05)
    return int(marker.read_text())


def main() -> int:
    config, marker, pause_step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    pause_rank = int(sys.argv[4]) if len(sys.argv) > 4 else 0

    from pyalign.cli import main as pyalign_main
    from pyalign.tasks.sft import run_sft
    from pyalign.train import get_task, register_task
    from pyalign.train.preemption import requested

    def pause(event, info):
        if event == "step" and info["step"] == pause_step and int(os.environ.get("RANK", "0")) == pause_rank:
            marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while requested() is None and time.monotonic() < deadline:
                time.sleep(0.02)

    task = get_task("sft")
    register_task(type(task)(task.name, task.config_class, lambda c, callback=None: run_sft(c, callback=pause),
                             task.check, task.summary, task.doc))
    return pyalign_main(["train", config, "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
