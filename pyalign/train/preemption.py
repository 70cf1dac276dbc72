"""Stopping a run cleanly on a signal: finish the optimizer step, write a checkpoint, exit.

A scheduler that is about to take the machine away warns with a signal: SLURM with
``--signal=B:TERM@120`` (or ``USR1``), Kubernetes and most batch systems with SIGTERM followed by
SIGKILL after a grace period. :func:`handling` (entered by :func:`pyalign.train.start_run` for the
whole run) turns ``training.preempt_signals`` (default SIGTERM and SIGUSR1) and SIGINT (Ctrl-C)
into a request; the trainer looks at it after every optimizer step, writes a checkpoint and raises
:class:`Preempted`, which ``pyalign`` reports in one line with exit status :data:`EXIT_PREEMPTED`
(:data:`EXIT_INTERRUPTED` for SIGINT). The tasks also look between their stages (rounds, cache
entries, DPA iterations).

With several processes every one must stop at the same step, since the checkpoint (and under FSDP
its collective write) needs them all: the trainer shares each process's request in the gather it
makes every step anyway, and :func:`stop_if_requested` all-reduces it. A second SIGINT stops at
once (KeyboardInterrupt): the checkpoint already on disk stands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import torch

from pyalign import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped before its end and resumes when started again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")

_requested: str | None = None


class Preempted(Exception):
    """The run stopped on a signal after writing what it needs to resume."""

    def __init__(self, signal_name: str, where: str, checkpoint: str | None = None):
        self.signal_name = signal_name
        self.exit_status = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED
        saved = f"checkpoint {checkpoint} written" if checkpoint else "everything finished so far is saved"
        super().__init__(f"stopped by {signal_name} {where}: {saved}; run the same command again to resume")


def requested() -> str | None:
    """The signal that asked this process to stop, if any."""
    return _requested


def _on_signal(number: int, _frame) -> None:
    global _requested
    name = signal.Signals(number).name
    if _requested is None:
        _requested = name
        # os.write, not logging: a handler may run in the middle of a logging call
        os.write(2, f"pyalign: {name} received: stopping after the current step with a checkpoint "
                    f"(pid {os.getpid()})\n".encode())
    if number == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


@contextlib.contextmanager
def handling(signal_names: Sequence[str]) -> Iterator[None]:
    """Turn ``signal_names`` and SIGINT into stop requests until the block ends (only in the main
    thread, where Python runs signal handlers; elsewhere nothing is installed)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    previous = {}
    for name in dict.fromkeys([*signal_names, "SIGINT"]):
        number = getattr(signal, name)
        previous[number] = signal.signal(number, _on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _requested = None


def first_request(requests: Sequence[str | None]) -> str | None:
    """The signal of the first process that asked to stop (from a gather of :func:`requested`)."""
    return next((r for r in requests if r is not None), None)


def stop_if_requested(where: str) -> None:
    """Raise :class:`Preempted` on every process when any asked to stop. Collective in a
    multi-process run: call it where every process passes (between stages)."""
    name = _requested
    if distributed.world_size() > 1:
        flags = torch.zeros(len(SIGNALS), dtype=torch.float64)
        if name is not None:
            flags[SIGNALS.index(name)] = 1
        distributed.all_reduce_sum(flags)
        asked = [SIGNALS[i] for i in range(len(SIGNALS)) if flags[i] > 0]
        name = asked[0] if asked else None
    if name is not None:
        raise Preempted(name, where)
