"""What every task does first: its threads, the process group under a launcher, its device, and
its output folder with the resolved config (``config.json``, written by process 0, after the
launcher's sharding has been adopted)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyalign import distributed
from pyalign.io import write_json_atomic
from pyalign.models import resolve_device
from pyalign.train.registry import config_to_dict
from pyalign.train.sharding import check_sharding


def start_run(config) -> tuple[torch.device, Path]:
    """Set up a run of ``config`` (a loaded task config with ``training`` and ``output_dir``);
    returns this process's device and the output folder."""
    training = config.training
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    device = distributed.process_device(resolve_device(training.device))
    distributed.init_from_env(device)
    # Before config.json: an accelerate FSDP launch switches training.sharding (and cpu_offload),
    # and the recorded config must say what the run did.
    check_sharding(training, device)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_json_atomic(output_dir / "config.json", config_to_dict(config))
    return device, output_dir
