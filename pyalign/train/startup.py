"""What every task does first, for the whole of its run: its threads, the process group under a
launcher, its device, its output folder (one run at a time: :func:`pyalign.lock.exclusive`) with
the resolved config (``config.json``, written by process 0 after the launcher's sharding has been
adopted, and left untouched when it is the same), and stopping cleanly on a signal
(:mod:`pyalign.train.preemption`).

    with start_run(config) as (device, output_dir):
        ...   # the task's stages

(``device, output_dir = start_run(config)``, the form before the lock existed, still sets the run
up, without holding the lock past that line.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pyalign import distributed
from pyalign.failures import describe_error
from pyalign.io import write_json_atomic
from pyalign.lock import LOCK_FILE, exclusive
from pyalign.models import resolve_device
from pyalign.train import preemption
from pyalign.train.config_fields import ConfigError
from pyalign.train.registry import config_to_dict
from pyalign.train.sharding import check_sharding


class OtherProcessError(ValueError):
    """Process 0 could not start the run (a bad or busy output folder); every other process stops
    with its message and the same exit status."""


def _prepare_output(config, output_dir: Path, stack: contextlib.ExitStack) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file, expected a folder (or a path that does not exist yet)")
    output_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(exclusive(output_dir / LOCK_FILE, what=f"output_dir {output_dir}"))
    write_json_atomic(output_dir / "config.json", config_to_dict(config))


class Run:
    """A started run (see :func:`start_run`): ``device`` and ``output_dir``; a context manager
    whose exit releases the output folder's lock and the signal handlers (so does :meth:`close`,
    or dropping the object)."""

    def __init__(self, config):
        training = config.training
        if training.num_threads:
            torch.set_num_threads(training.num_threads)
        self.device = distributed.process_device(resolve_device(training.device))
        distributed.init_from_env(self.device)
        # Before config.json: an accelerate FSDP launch switches training.sharding (and cpu_offload),
        # and the recorded config must say what the run did.
        check_sharding(training, self.device)
        self.output_dir = Path(config.output_dir)
        self._held = contextlib.ExitStack()
        problem = None
        if distributed.is_main():
            try:
                _prepare_output(config, self.output_dir, self._held)
            except (OSError, ValueError) as error:
                problem = error
        shared = distributed.broadcast_object(None if problem is None else _one_line(problem))
        if problem is not None:
            self.close()
            raise problem
        if shared is not None:
            raise OtherProcessError(f"process 0 could not start the run: {shared}")
        self._held.enter_context(preemption.handling(training.preempt_signals))

    def __iter__(self):  # ``device, output_dir = start_run(config)``
        return iter((self.device, self.output_dir))

    def __enter__(self) -> tuple[torch.device, Path]:
        return self.device, self.output_dir

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._held.close()

    def __del__(self) -> None:
        held = getattr(self, "_held", None)
        if held is not None:
            held.close()


def start_run(config) -> Run:
    """Set up a run of ``config`` (a loaded task config with ``training`` and ``output_dir``):
    threads, process group, device, output folder with ``config.json``; process 0 holds the output
    folder's lock (the others wait for it, and stop with its error if it could not start), and
    stop signals are handled (:mod:`pyalign.train.preemption`) until the run is closed. Use it as
    ``with start_run(config) as (device, output_dir): ...``."""
    return Run(config)


def _one_line(error: BaseException) -> str:
    return describe_error(error) if isinstance(error, OSError) else str(error)
