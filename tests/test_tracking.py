"""Experiment tracking (``training.report_to``): real runs of the trainer on a tiny random Llama,
read back through each library's own reader.

- every tracker gets the trainer's logged points (train and eval, at the trainer's steps) and the
  run's config and fingerprint: tensorboard (event files, read by TensorBoard's
  EventAccumulator), wandb in offline mode (its ``.wandb`` transaction log, decoded with wandb's
  own protobuf records), mlflow on its SQLite store under the run dir (MlflowClient);
- a run killed mid-round (an exception from the step callback) and resumed ends with exactly one
  point per step in every tracker, equal to the finished run's history;
- with 2 processes (gloo) only process 0 logs: one run per tracker;
- a tracker whose client is missing stops the trainer with one message naming the field and the
  install command; so does a name that is not a tracker.

Nothing leaves the machine: wandb runs offline with its server address pointed at a closed local
port, MLflow's and wandb's telemetry and error reporting are off, and every socket this process
connects is checked to be local.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_processes import free_port  # noqa: E402
from helpers_tiny_lm import Crash, crash_at, make_model, make_tokenizer, one_thread, random_sentence

from pyalign import distributed
from pyalign.models import apply_lora
from pyalign.tasks.sft.data import SFTDataset, SFTExample
from pyalign.train import LoraConfig, TrainingConfig, tracking
from pyalign.train.objectives import SFTObjective
from pyalign.train.trainer import Trainer

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
ALL = ["tensorboard", "wandb", "mlflow"]
# 7 examples in micro-batches of 2: 4 steps per epoch, 8 in all
STEPS = 8
FINGERPRINT = {"base_model": "tiny-llama-seed-0", "train_data": "sft-7-seed-4", "training": {"lr": 0.01}}


# ----------------------------------------------------------------------------- no network

_connections: list | None = None


def _audit(event, args):
    # every connect() of this process while a test records them (hooks cannot be removed)
    if event == "socket.connect" and _connections is not None:
        _connections.append(args[1])


sys.addaudithook(_audit)


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # a unix socket
        return True
    host = address[0]
    return host in ("localhost", "::1") or host.startswith("127.")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """wandb offline, no telemetry, nothing written outside tmp_path; fails a test that
    connected this process to anything but the machine itself."""
    global _connections
    home = tmp_path / "home"
    for variable in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME",
                     "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    # were anything to try the server, it would knock on a closed local port, not on the internet
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(home / variable.lower()))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    _connections = []
    yield
    connections, _connections = _connections, None
    remote = [address for address in connections if not _is_local(address)]
    assert not remote, f"connected to non-local addresses: {remote}"


# ----------------------------------------------------------------------------- a tiny run

def training_config(report_to, **overrides):
    base = {"lr": 1e-2, "epochs": 2, "batch_size": 2, "grad_accum": 1, "max_length": 32, "max_prompt_length": 16,
            "warmup_ratio": 0.0, "log_every": 1, "eval_every": 3, "save_every": 2, "progress_bar": False, "seed": 0}
    return TrainingConfig(**{**base, **overrides}, report_to=report_to)


def examples(n, seed):
    rng = random.Random(seed)
    return [SFTExample(random_sentence(rng, 2, 7), random_sentence(rng, 1, 9)) for _ in range(n)]


def make_trainer(run_dir, report_to, callback=None, **overrides):
    tokenizer = make_tokenizer()
    train = SFTDataset(examples(7, seed=4), tokenizer, 32, 16)
    held_out = SFTDataset(examples(4, seed=5), tokenizer, 32, 16)
    model = apply_lora(make_model(len(tokenizer), seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give A a gradient from the first step
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return Trainer(model, SFTObjective(), train, training_config(report_to, **overrides), run_dir, eval=held_out,
                   fingerprint=FINGERPRINT, callback=callback, name="sft tiny")


def history_points(result, metric="loss"):
    return {entry["step"]: entry[metric] for entry in result["history"]}


# ----------------------------------------------------------------------------- reading each tracker back

def tensorboard_run(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data (the default) applies purge_step, as TensorBoard shows the run
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def tensorboard_points(accumulator, tag):
    events = accumulator.Scalars(tag)
    return [(event.step, event.value) for event in events]


def tensorboard_text(accumulator, tag):
    (event,) = accumulator.Tensors(f"{tag}/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    return event.step, json.loads(textwrap.dedent(text))


WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records
WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file, decoded with wandb's own
    ``Record`` message (record frame: crc32 4 bytes, length 2, type 1; a record that crosses a
    block boundary is split FIRST / MIDDLE... / LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    position, pieces = WANDB_HEADER, b""
    while position + 7 <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        if left_in_block < 7:  # too small for a frame: zero padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # padding at the end of a block
            position += left_in_block
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces + payload)
            pieces = b""
            yield record
        else:
            pieces = (pieces if kind == MIDDLE else b"") + payload


def wandb_attempts(wandb_dir):
    """Each offline attempt of the run (in start order): its run record, history rows
    ``{step: {key: value}}`` and exit code."""
    attempts = []
    for run_file in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        run, rows, exit_code = None, {}, None
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                assert record.history.step.num not in rows, f"{run_file}: step {record.history.step.num} twice"
                rows[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "exit":
                exit_code = record.exit.exit_code
        # wandb-core (a process of its own, out of this process's audit hook) logs what it sends;
        # offline, with the server address pointed at 127.0.0.1:9, it must never have tried
        log = (run_file.parent / "logs" / "debug-internal.log").read_text()
        assert "127.0.0.1:9" not in log, f"{run_file.parent}: wandb-core tried to reach the server"
        attempts.append({"run": run, "rows": rows, "exit_code": exit_code, "file": run_file})
    return attempts


def wandb_config(run_record):
    return {item.key: json.loads(item.value_json) for item in run_record.config.update}


def mlflow_client(run_dir):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}")


def mlflow_runs(run_dir):
    client = mlflow_client(run_dir)
    experiment = client.get_experiment_by_name("pyalign")
    return client, client.search_runs([experiment.experiment_id])


def mlflow_points(client, run_id, key):
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


def needs(*modules):
    missing = [m for m in modules if not tracking._installed(m)]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: pip install "
                                                      '"pyalign[wandb,mlflow]" (the Makefile installs them)')


# ----------------------------------------------------------------------------- tests

@needs("wandb", "mlflow", "sqlalchemy", "alembic")
def test_every_tracker_gets_the_history_config_and_fingerprint(tmp_path):
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir, ALL)
    result = trainer.train()
    expected = history_points(result)
    assert sorted(expected) == list(range(1, STEPS + 1))
    eval_steps = [3, 6, STEPS]  # eval_every=3, and the final eval
    digest = tracking.fingerprint_digest(FINGERPRINT)

    # tensorboard: the trainer's tags and steps as before; config and fingerprint as text at step 0
    board = tensorboard_run(run_dir)
    metric_names = set().union(*(entry.keys() for entry in result["history"])) - {"step"}
    assert {f"train/{name}" for name in metric_names} | {f"eval/{name}" for name in result["eval"]} \
        == set(board.Tags()["scalars"])
    points = tensorboard_points(board, "train/loss")
    assert [step for step, _ in points] == sorted(expected)
    for step, value in points:
        assert value == pytest.approx(expected[step], rel=1e-6)  # event files hold float32
    assert [step for step, _ in tensorboard_points(board, "eval/loss")] == eval_steps
    step, config = tensorboard_text(board, "run/config")
    assert step == 0 and config["training"]["lr"] == 1e-2 and config["name"] == "sft tiny"
    assert tensorboard_text(board, "run/fingerprint") == (0, FINGERPRINT)

    # wandb, offline: one run, files under the run dir; every step once, values as logged
    (attempt,) = wandb_attempts(run_dir / "wandb")
    state = json.loads((run_dir / "wandb" / "pyalign-run.json").read_text())
    assert attempt["run"].run_id == state["run_id"] and attempt["run"].display_name == "sft tiny"
    assert attempt["run"].project == "pyalign" and attempt["exit_code"] == 0
    rows = attempt["rows"]
    assert {step: row["train/loss"] for step, row in rows.items()} == expected
    assert sorted(step for step, row in rows.items() if "eval/loss" in row) == eval_steps
    assert rows[STEPS]["eval/loss"] == result["eval"]["loss"]
    config = wandb_config(attempt["run"])
    assert config["fingerprint"] == FINGERPRINT and config["fingerprint_digest"] == digest
    assert config["training"]["lr"] == 1e-2 and config["training"]["eval_every"] == 3

    # mlflow: one finished run in the SQLite store under the run dir
    client, runs = mlflow_runs(run_dir)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_name == "sft tiny"
    assert mlflow_points(client, run.info.run_id, "train/loss") == sorted(expected.items())
    assert [step for step, _ in mlflow_points(client, run.info.run_id, "eval/loss")] == eval_steps
    assert run.data.params["training.lr"] == "0.01" and run.data.params["fingerprint.base_model"] == "tiny-llama-seed-0"
    assert run.data.tags["pyalign.fingerprint_digest"] == digest
    from mlflow.artifacts import load_dict

    artifacts = run.info.artifact_uri
    assert artifacts.startswith((run_dir / "mlflow" / "artifacts").resolve().as_uri())
    assert load_dict(f"{artifacts}/pyalign/fingerprint.json") == FINGERPRINT
    assert load_dict(f"{artifacts}/pyalign/config.json")["training"]["seed"] == 0


@needs("wandb", "mlflow", "sqlalchemy", "alembic")
def test_a_killed_and_resumed_run_has_one_point_per_step(tmp_path):
    """Checkpoints every 4 steps, eval every 5; killed after step 7 was logged: the resumed run
    restarts from the checkpoint at step 4 and trains steps 5..7 again, which the killed attempt
    had logged already (and step 5's eval). Every tracker ends with steps 1..8 once each."""
    run_dir = tmp_path / "run"
    schedule = {"save_every": 4, "eval_every": 5}
    killed = make_trainer(run_dir, ALL, callback=crash_at("step", lambda info: info["step"] == 7), **schedule)
    with pytest.raises(Crash):
        killed.train()
    assert [entry["step"] for entry in killed.history] == list(range(1, 8))
    resumed = make_trainer(run_dir, ALL, **schedule)
    result = resumed.train()
    assert resumed.history is result["history"] and resumed.step == STEPS
    expected = history_points(result)
    assert sorted(expected) == list(range(1, STEPS + 1))
    eval_steps = [5, STEPS]

    board = tensorboard_run(run_dir)
    points = tensorboard_points(board, "train/loss")
    assert [step for step, _ in points] == list(range(1, STEPS + 1))  # 5..7 purged, then logged again
    for step, value in points:
        assert value == pytest.approx(expected[step], rel=1e-6)
    assert [step for step, _ in tensorboard_points(board, "eval/loss")] == eval_steps
    assert tensorboard_text(board, "run/fingerprint") == (0, FINGERPRINT)  # attached once

    # wandb: two offline attempts of one run id. The killed one sent steps 1..6 (step 7's row,
    # unfinished when it died, was not sent) and ended failed; the resumed one skipped 5 and 6
    # and sent 7 and 8. Steps trained again give the same points, so the rows equal the history.
    first, second = wandb_attempts(run_dir / "wandb")
    assert first["run"].run_id == second["run"].run_id
    assert first["exit_code"] == 1 and second["exit_code"] == 0
    assert sorted(first["rows"]) == [1, 2, 3, 4, 5, 6] and sorted(second["rows"]) == [7, 8]
    rows = {**first["rows"], **second["rows"]}
    assert {step: row["train/loss"] for step, row in rows.items()} == expected
    assert sorted(step for step, row in rows.items() if "eval/loss" in row) == eval_steps

    # mlflow: the same run reopened; the points of steps 5..7 the killed attempt logged not twice
    client, runs = mlflow_runs(run_dir)
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert mlflow_points(client, run.info.run_id, "train/loss") == sorted(expected.items())
    assert [step for step, _ in mlflow_points(client, run.info.run_id, "eval/loss")] == eval_steps


def test_tensorboard_alone_is_the_default_and_writes_what_it_always_did(tmp_path):
    trainer = make_trainer(tmp_path / "run", ["tensorboard"], eval_every=0)
    assert tracking.report_to_of(TrainingConfig()) == ["tensorboard"]  # the default
    result = trainer.train()
    board = tensorboard_run(tmp_path / "run")
    assert [step for step, _ in tensorboard_points(board, "train/lr")] == list(range(1, STEPS + 1))
    assert [step for step, _ in tensorboard_points(board, "eval/loss")] == [STEPS]
    assert sorted(board.Tags()["tensors"]) == ["run/config/text_summary", "run/fingerprint/text_summary"]
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "run" / "mlflow").exists()
    assert len(result["history"]) == STEPS


def test_tensorboard_false_logs_nowhere(tmp_path):
    """A config that says ``tensorboard: false`` (and nothing about report_to) logs nowhere."""
    training = TrainingConfig(tensorboard=False)
    assert tracking.report_to_of(training) == []
    run_dir = tmp_path / "run"
    make_trainer(run_dir, [], eval_every=0).train()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.json"]


def test_a_missing_client_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if not installed
    with pytest.raises(ImportError) as error:
        make_trainer(tmp_path / "run", ["tensorboard", "wandb"])
    assert str(error.value) == 'training.report_to: wandb needs the wandb package: pip install "pyalign[wandb]"'
    assert not (tmp_path / "run").exists()  # stopped before anything was written

    monkeypatch.setitem(sys.modules, "alembic", None)
    with pytest.raises(ImportError, match=r'^training\.report_to: mlflow needs the alembic package: '
                                          r'pip install "pyalign\[mlflow\]"$'):
        tracking.check_report_to(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: no local store needed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"^training\.report_to: mlflow needs the mlflow package: "):
        tracking.check_report_to(["mlflow"])

    # the client is imported when the tracker opens: a failing import there says the same
    with pytest.raises(ImportError, match=r'^training\.report_to: wandb needs the wandb package: pip install '
                                          r'"pyalign\[wandb\]" \(import of wandb halted'):
        tracking.open_trackers(["wandb"], tmp_path / "run", run_name="x", config={}, fingerprint={}, start_step=0)


def test_report_to_names_are_checked():
    with pytest.raises(ValueError, match=r"^training\.report_to: unknown tracker 'comet'; expected a list of "
                                         r"tensorboard, wandb, mlflow$"):
        tracking.check_report_to(["tensorboard", "comet"])
    with pytest.raises(ValueError, match=r"^training\.report_to: tensorboard is listed twice$"):
        tracking.check_report_to(["tensorboard", "tensorboard"])
    with pytest.raises(ValueError, match=r"^training\.report_to: expected a list of .*, got the string 'wandb'$"):
        tracking.check_report_to("wandb")
    assert tracking.check_report_to([]) == []


# ----------------------------------------------------------------------------- two processes



def _worker(rank, world, port, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    result = make_trainer(Path(run_dir), ALL, eval_every=0).train()
    (Path(run_dir).parent / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


@needs("wandb", "mlflow", "sqlalchemy", "alembic")
def test_only_process_zero_logs(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # wandb's files in a folder of their own (WANDB_DIR), away from the run dir
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(2, free_port(), str(run_dir)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    expected = history_points(result)

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in tensorboard_points(tensorboard_run(run_dir), "train/loss")] == sorted(expected)
    assert not (run_dir / "wandb" / "wandb").exists()  # WANDB_DIR honoured
    (attempt,) = wandb_attempts(tmp_path / "wandb-dir" / "wandb")
    assert {step: row["train/loss"] for step, row in attempt["rows"].items()} == expected
    assert wandb_config(attempt["run"])["processes"] == 2
    client, runs = mlflow_runs(run_dir)
    (run,) = runs
    assert mlflow_points(client, run.info.run_id, "train/loss") == sorted(expected.items())
