"""One run per output: ``pyalign train`` holds ``<output_dir>/.pyalign.lock`` (``pyalign data export``
and ``clair`` a lock beside their ``--out``) for the whole run. The holder here is a real process
(pyalign/lock.py alone, loaded from its file: it needs nothing but the standard library, so the
process starts at once); a second ``pyalign`` gets one line naming the holder's pid and host, and
the lock of a process killed with SIGKILL, which the kernel drops, does not block the next one.
(tests/test_preemption.py: a second run started while a first trains is refused; under two
processes, process 0 holds the lock.)"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers_tiny_lm import one_thread, random_sentence, save_tiny_model, write_jsonl
from pyalign.cli import main
from pyalign.lock import LOCK_FILE, OutputInUseError, exclusive

REPO = Path(__file__).resolve().parents[1]
single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.exclusive(sys.argv[2], what="test"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(lock_file: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO / "pyalign" / "lock.py"), str(lock_file)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    rng = random.Random(2)
    data = write_jsonl(root / "sft.jsonl", [{"prompt": random_sentence(rng, 2, 5), "response": random_sentence(rng)}
                                            for _ in range(4)])
    config = {"task": "sft", "model": {"path": str(save_tiny_model(root / "pi0"))}, "data": {"train": str(data)},
              "training": {"epochs": 1, "batch_size": 2, "max_length": 32, "max_prompt_length": 16,
                           "progress_bar": False, "tensorboard": False, "device": "cpu"},
              "output_dir": str(root / "unused")}
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    return root / "c.yaml"


def test_a_held_output_dir_is_refused_and_a_killed_holder_does_not_block(sft_config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold(out / LOCK_FILE)
    assert main(["train", str(sft_config), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"pyalign train: error: output_dir {out}: in use by another pyalign process (pid {holder.pid} on host "
            f"{socket.gethostname()}, running `") in err
    assert not (out / "config.json").exists()  # nothing written by the refused run
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert main(["train", str(sft_config), "--output-dir", str(out), "--no-progress"]) == 0
    assert (out / "model").is_dir()


def test_data_export_takes_a_lock_beside_its_output(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a b", "chosen": "c", "rejected": "d"}])
    out = tmp_path / "exported.jsonl"
    holder = hold(tmp_path / f".{out.name}.lock")
    assert main(["data", "export", str(source), "--out", str(out)]) == 2
    assert f"pyalign data: error: --out {out}: in use by another pyalign process (pid {holder.pid}" in \
        capsys.readouterr().err
    assert not out.exists()
    holder.kill()
    holder.wait()
    assert main(["data", "export", str(source), "--out", str(out)]) == 0
    assert out.read_text().count("\n") == 1


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with exclusive(tmp_path / "x.lock", what="first"):
        with pytest.raises(OutputInUseError, match="first: in use by another pyalign process"):
            with exclusive(tmp_path / "x.lock", what="first"):
                pass
    with exclusive(tmp_path / "x.lock", what="again"):  # released on exit
        pass
