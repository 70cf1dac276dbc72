"""A real signal sent to a real ``pyalign train`` (tests/helpers_paused_run.py pauses its trainer at a
known step so the signal lands there): the run finishes its optimizer step, writes a checkpoint,
prints one line and exits 75 (SIGTERM, SIGUSR1) or 130 (SIGINT) without a traceback; the same
command resumes and ends with the uninterrupted run's weights. Under two processes a signal to
one of them stops both at the same step, with the collective (torch.distributed.checkpoint)
checkpoint written by both."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_paused_run import child_env, start, wait_for
from helpers_tiny_lm import one_thread, save_tiny_model, tiny_sft_config, write_sft_rows
from pyalign.cli import main
from pyalign.train.checkpoint import find_checkpoint

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    model = save_tiny_model(root / "pi0")
    sft = write_sft_rows(root / "sft.jsonl", 8, seed=11)
    return root, model, sft


def config_file(assets, path: Path, output_dir: Path, **training) -> Path:
    _, model, sft = assets
    config = tiny_sft_config(model, sft, output_dir, **{"save_every": 0, "warmup_ratio": 0.0, **training})
    path.write_text(yaml.safe_dump(config))
    return path


def weights(output_dir: Path) -> dict:
    return load_file(str(output_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    assert main(["train", str(config_file(assets, folder / "c.yaml", folder / "out")), "--no-progress"]) == 0
    return weights(folder / "out")


@pytest.mark.parametrize("name,status", [("SIGTERM", 75), ("SIGINT", 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(assets, straight, tmp_path, name,
                                                                             status, capsys):
    """Also the output folder's lock (pyalign.lock): a second run started while the first trains is
    refused naming the first's pid and host (tests/test_output_lock.py: the rest of the lock)."""
    run = config_file(assets, tmp_path / "run.yaml", tmp_path / "run")
    child = start(run, tmp_path / "marker", 2)
    pid = wait_for(tmp_path / "marker", [child])
    assert main(["train", str(run), "--no-progress"]) == 2
    assert (f"pyalign train: error: output_dir {tmp_path / 'run'}: in use by another pyalign process (pid {pid} on "
            f"host {socket.gethostname()}, running `") in capsys.readouterr().err
    os.kill(pid, getattr(signal, name))
    _, err = child.communicate(timeout=240)
    assert child.returncode == status, err[-3000:]
    assert "Traceback" not in err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (f"pyalign train: stopped by {name} at sft step 2/4: checkpoint {checkpoints / 'step_000002'} "
            "written; run the same command again to resume") in err.splitlines()
    assert find_checkpoint(checkpoints)[0].step == 2
    assert main(["train", str(run), "--no-progress"]) == 0  # the same command resumes
    # to float rounding: steps 1-2 ran in the child, whose kernels round slightly differently from this
    # process's (bit for bit within one process: tests/test_integrity.py); a lost or repeated step
    # would move the weights by ~1e-2
    for key, value in weights(tmp_path / "run").items():
        assert torch.allclose(value, straight[key], rtol=0, atol=1e-6), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stop_together_with_a_collective_checkpoint(assets, tmp_path):
    """SIGUSR1 to process 1 alone, while process 0 has gone on to the next step's collectives: both
    stop after that step and write its sharded checkpoint together."""
    sharded = {"sharding": "fsdp", "save_every": 1}
    run = config_file(assets, tmp_path / "run.yaml", tmp_path / "run", **sharded)
    port = free_port()
    children = [start(run, tmp_path / "marker", 2, rank=1, env=child_env(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port))) for rank in range(2)]
    pid = wait_for(tmp_path / "marker", children)
    # process 0 holds the output folder's lock; process 1 took none
    holder = json.loads((tmp_path / "run" / ".pyalign.lock").read_text())
    assert holder["pid"] == children[0].pid and pid == children[1].pid
    os.kill(pid, signal.SIGUSR1)
    outputs = [child.communicate(timeout=240) for child in children]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 75, err[-3000:]
        assert "Traceback" not in err
        assert (f"pyalign train: stopped by SIGUSR1 at sft step 3/4: checkpoint "
                f"{tmp_path / 'run' / 'checkpoints' / 'step_000003'} written") in err
    checkpoint, _ = find_checkpoint(tmp_path / "run" / "checkpoints")
    assert (checkpoint.step, checkpoint.format) == (3, "dcp")
    assert len(list(checkpoint.folder.glob("*.distcp"))) == 2  # one shard file per process
    # resumed in one process (a DCP checkpoint reshards on load) it ends as one uninterrupted process does
    straight = config_file(assets, tmp_path / "straight.yaml", tmp_path / "straight", **sharded)
    assert main(["train", str(straight), "--no-progress"]) == 0
    assert main(["train", str(run), "--no-progress"]) == 0
    expected = weights(tmp_path / "straight")
    for name, value in weights(tmp_path / "run").items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
