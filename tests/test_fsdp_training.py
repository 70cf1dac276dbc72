"""Sharded training (``training.sharding: fsdp``, torch FSDP2) with 2 real CPU processes (gloo)
against the same config in 1 process without sharding, and full fine-tuning (``lora: null``).

- every task (preference rounds with LoRA and with full fine-tuning, SPO with its frozen chain,
  SFT, the reward model) under ``torchrun`` x 2 with fsdp ends with the final weights and the logged
  losses of one unsharded process, to float rounding;
- a sharded run SIGKILLed at random moments resumes under 1 and under 2 processes to the
  uninterrupted result (torch.distributed.checkpoint checkpoints, resharded on load); a
  checkpoint torn mid-write is never loaded;
- ``sharding: fsdp`` in one process trains exactly as ``none``; clear refusals for models FSDP
  cannot be applied to layer by layer, CPU offload on a CPU run, and checkpoints of the other kind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny_lm import make_pairs, random_sentence, save_tiny_model, write_jsonl  # noqa: E402

from pyalign.train import get_task, load_config  # noqa: E402

TRAINING = {"lr": 5e-3, "epochs": 2, "batch_size": 3, "grad_accum": 2, "eval_batch_size": 2, "max_length": 32,
            "max_prompt_length": 16, "warmup_ratio": 0.2, "save_every": 1, "log_every": 1,
            "progress_bar": False, "tensorboard": False, "device": "cpu"}
LORA = {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model = save_tiny_model(root / "pi0", seed=0)
    rng = random.Random(3)
    files = {"model": model}
    for i, marker in enumerate(["bright", "cold"]):
        files[f"train{i}"] = write_jsonl(root / f"train{i}.jsonl", make_pairs(7, seed=30 + i, marker=marker))
        files[f"eval{i}"] = write_jsonl(root / f"eval{i}.jsonl", make_pairs(3, seed=40 + i, marker=marker))
    files["sft"] = write_jsonl(root / "sft.jsonl", [{"prompt": random_sentence(rng, 2, 6), "response": random_sentence(rng)}
                                                    for _ in range(7)])
    files["ratings"] = write_jsonl(root / "ratings.jsonl", [
        {"prompt": random_sentence(rng, 2, 5), "response": r, "ratings": {"helpfulness": rng.randint(0, 4),
                                                                          "verbosity": len(r.split())}}
        for r in (random_sentence(rng, 1, 9) for _ in range(9))])
    return root, files


def task_config(files, kind: str, output_dir: Path) -> dict:
    model = {"path": str(files["model"])}
    rounds = [{"name": f"dim{i}", "train": str(files[f"train{i}"]), "eval": str(files[f"eval{i}"])} for i in range(2)]
    if kind == "preference_lora":
        return {"model": model, "rounds": rounds[:1], "lora": LORA, "method": {"loss": "dpo"},
                "training": TRAINING, "output_dir": str(output_dir)}
    if kind == "preference_full":
        return {"model": model, "rounds": rounds[:1], "lora": None, "method": {"loss": "apo_zero"},
                "training": {**TRAINING, "lr": 1e-3}, "output_dir": str(output_dir)}
    if kind == "spo_chain":
        return {"model": model, "rounds": rounds, "lora": LORA, "method": {"loss": "spo", "alpha": 0.3},
                "training": {**TRAINING, "epochs": 1}, "output_dir": str(output_dir)}
    if kind == "sft_full":
        return {"task": "sft", "model": model, "data": {"train": str(files["sft"]), "eval": str(files["sft"])},
                "lora": None, "training": {**TRAINING, "lr": 1e-3}, "output_dir": str(output_dir)}
    if kind == "reward_model":
        return {"task": "reward_model", "model": model, "objectives": {"helpfulness": [0, 4], "verbosity": None},
                "data": {"train": str(files["ratings"]), "eval": str(files["ratings"])}, "lora": LORA,
                "training": {**TRAINING, "lr": 1e-2, "max_length": 48, "max_prompt_length": 24},
                "output_dir": str(output_dir)}
    raise ValueError(kind)


def with_sharding(config: dict, sharding: str) -> dict:
    return {**config, "training": {**config["training"], "sharding": sharding}}


def run_here(config: dict, **kwargs):
    """The config's task in this process (one process, no process group)."""
    loaded = load_config(config)
    return get_task(config.get("task", "preference")).run(loaded, **kwargs)


def torchrun(config: dict, tmp_path: Path, nproc: int = 2, *, wait: bool = True):
    file = tmp_path / f"config_{time.monotonic_ns()}.yaml"
    file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "pyalign", "train", str(file), "--device", "cpu", "--no-progress"]
    if not wait:
        return subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done


def final_weights(output_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "reward_model":
        folder = output_dir / "reward_model"
        return {**load_file(str(folder / "backbone" / "model.safetensors")),
                **{f"head.{k}": v for k, v in load_file(str(folder / "head.safetensors")).items()}}
    model_dirs = sorted(output_dir.glob("round_*/model")) or [output_dir / "model"]
    return load_file(str(model_dirs[-1] / "model.safetensors"))


def histories(output_dir: Path) -> list[list[dict]]:
    files = sorted(output_dir.glob("round_*/metrics.json")) or [output_dir / "metrics.json"]
    return [json.loads(f.read_text())["history"] for f in files]


def assert_same_result(got: Path, expected: Path, kind: str, *, atol=1e-5):
    for run_got, run_expected in zip(histories(got), histories(expected), strict=True):
        assert [h["step"] for h in run_got] == [h["step"] for h in run_expected]
        for a, b in zip(run_got, run_expected):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6), (a, b)
    a, b = final_weights(got, kind), final_weights(expected, kind)
    assert sorted(a) == sorted(b)
    for name in b:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=1e-4), name


# ----------------------------------------------------------------------------- 2 sharded == 1

@pytest.mark.parametrize("kind", ["preference_lora", "preference_full", "spo_chain", "sft_full", "reward_model"])
def test_two_processes_under_fsdp_equal_one_process(assets, tmp_path, kind):
    torch.set_num_threads(1)
    root, files = assets
    config = task_config(files, kind, tmp_path / "one")
    run_here(with_sharding(config, "none"))
    sharded = with_sharding({**config, "output_dir": str(tmp_path / "two")}, "fsdp")
    done = torchrun(sharded, tmp_path)
    if kind != "reward_model":  # the tiny model's lm_head is untied: its own group, vocabulary-parallel
        assert "fsdp: 2 decoder layers + lm_head + root sharded over 2 processes" in done.stdout + done.stderr
    assert_same_result(tmp_path / "two", tmp_path / "one", kind)
    checkpoints = [p for p in (tmp_path / "two").rglob("checkpoints") if p.is_dir()]
    assert not checkpoints  # removed once each stage finished
    if kind in ("preference_full", "sft_full"):  # full fine-tuning: no adapter, every weight moved
        folder = next(iter(sorted((tmp_path / "two").glob("round_*")) or [tmp_path / "two"]))
        assert not (folder / "adapter").exists()
        base = load_file(str(files["model"] / "model.safetensors"))
        trained = final_weights(tmp_path / "two", kind)
        moved = [name for name in base if not torch.equal(base[name], trained[name])]
        assert len(moved) == len(base), sorted(set(base) - set(moved))


# ----------------------------------------------------------------------------- kills and resumes

def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_job(process) -> None:
    """SIGKILL the launcher and every worker at once, as a preempted machine would."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def alive(pid: int) -> bool:
    """Any thread of the process still running (a killed worker whose launcher died first may stay
    a zombie: it runs nothing). Every thread, not the leader alone: the leader turns zombie while
    the others still exit holding the shared file table, and with it the output folder's lock."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # that thread ended meanwhile
            continue
        if state not in ("Z", "X"):
            return True
    return False


def checkpoint_step(checkpoints: Path) -> int:
    try:
        return json.loads((checkpoints / "latest.json").read_text())["step"]
    except (OSError, ValueError):  # none yet, or replaced while read
        return 0


def kill_at_a_random_moment(process, checkpoints: Path, rng: random.Random, total_steps: int) -> bool:
    """SIGKILL the launcher and every worker once the run's checkpoints are a random number of
    steps past where it started, a random fraction of a step later (while it trains, evaluates or
    writes a checkpoint); False if it ended first."""
    start = checkpoint_step(checkpoints)
    target = rng.randint(start + 1, max(start + 1, total_steps - 1))
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint_step(checkpoints) >= target:
            time.sleep(rng.uniform(0.0, 0.4))
            break
        time.sleep(0.02)
    workers = descendants(process.pid)
    if process.poll() is not None or not workers:
        return False
    kill_job(process)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived the kill"
    return True


def test_a_sharded_run_killed_at_random_moments_resumes_under_one_and_two_processes(assets, tmp_path):
    torch.set_num_threads(1)
    root, files = assets
    config = with_sharding(task_config(files, "sft_full", tmp_path / "straight"), "fsdp")
    config["training"] = {**config["training"], "epochs": 6}  # 12 steps, a checkpoint after each
    run_here(with_sharding(config, "none"))
    rng = random.Random(11)
    for resume_processes in (1, 2, 1):
        out = tmp_path / f"killed_{resume_processes}_{rng.random():.6f}"
        run = {**config, "output_dir": str(out)}
        killed = False
        for _ in range(3):  # a run that ended before its kill moment is started over elsewhere
            killed = kill_at_a_random_moment(torchrun(run, tmp_path, wait=False), out / "checkpoints", rng, 12)
            if killed:
                break
            shutil.rmtree(out, ignore_errors=True)
        assert killed
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["format"] == "dcp"
        if resume_processes == 1:
            run_here(run)
        else:
            torchrun(run, tmp_path)
        assert_same_result(out, tmp_path / "straight", "sft_full")


def test_a_torn_checkpoint_is_never_loaded(assets, tmp_path):
    """A kill during a save leaves a ``.partial_*`` folder (or a renamed folder that latest.json does
    not point at yet): resuming takes the complete checkpoint latest.json names, and ends as an
    uninterrupted run does."""
    torch.set_num_threads(1)
    root, files = assets
    config = with_sharding(task_config(files, "sft_full", tmp_path / "straight"), "fsdp")
    straight = run_here(config)
    from helpers_tiny_lm import Crash, crash_at

    run = {**config, "output_dir": str(tmp_path / "run")}
    with pytest.raises(Crash):
        run_here(run, callback=crash_at("step", lambda info: info["step"] == 3))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text()) == {"step": 2, "dir": "step_000002", "format": "dcp"}
    # the save of step 3 torn: its shards half-written under the partial name, and a later folder
    # renamed into place whose pointer update never happened
    partial = checkpoints / ".partial_step_000003"
    (checkpoints / "step_000002").rename(checkpoints / "kept")
    shutil.copytree(checkpoints / "kept", partial)
    shutil.copytree(checkpoints / "kept", checkpoints / "step_000004")
    (checkpoints / "kept").rename(checkpoints / "step_000002")
    for shard in partial.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 3])
    for shard in (checkpoints / "step_000004").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    events = []
    resumed = run_here(run, callback=lambda event, info: events.append(info.get("step")) if event == "step" else None)
    assert events[0] == 3  # from step 2, the complete checkpoint latest.json named
    assert resumed.metrics["eval"] == pytest.approx(straight.metrics["eval"], rel=1e-6)
    assert_same_result(tmp_path / "run", tmp_path / "straight", "sft_full", atol=1e-6)


# ----------------------------------------------------------------------------- one process, refusals

def test_fsdp_in_one_process_trains_as_none_and_writes_distributed_checkpoints(assets, tmp_path):
    torch.set_num_threads(1)
    root, files = assets
    config = task_config(files, "preference_lora", tmp_path / "none")
    run_here(with_sharding(config, "none"))
    from helpers_tiny_lm import Crash, crash_at

    sharded = with_sharding({**config, "output_dir": str(tmp_path / "fsdp")}, "fsdp")
    with pytest.raises(Crash):
        run_here(sharded, callback=crash_at("step", lambda info: info["step"] == 2))
    latest = json.loads((tmp_path / "fsdp" / "round_1_dim0" / "checkpoints" / "latest.json").read_text())
    assert latest["format"] == "dcp" and latest["step"] == 1
    run_here(sharded)
    assert_same_result(tmp_path / "fsdp", tmp_path / "none", "preference_lora", atol=1e-7)


def test_a_single_file_checkpoint_is_refused_by_a_sharded_model_with_what_to_do(tmp_path):
    """A run started with ``sharding: none`` and resumed sharded: the single-file checkpoint holds
    whole tensors for one process; the sharded trainer says what to do instead of guessing."""
    from helpers_tiny_lm import make_model, make_tokenizer

    from pyalign.tasks.sft import SFTDataset, SFTExample
    from pyalign.train import SFTObjective, Trainer, TrainingConfig

    tokenizer = make_tokenizer()
    data = SFTDataset([SFTExample("the cat", "a dog"), SFTExample("a bird", "the sun")], tokenizer, 16, 8)
    training = TrainingConfig(**{**TRAINING, "epochs": 1, "batch_size": 1, "grad_accum": 1})
    Trainer(make_model(len(tokenizer)), SFTObjective(), data, training, tmp_path).save()  # step 0, one file
    trainer = Trainer(make_model(len(tokenizer)), SFTObjective(), data, training, tmp_path)
    trainer.sharded = True  # as under FSDP2 with several processes
    with pytest.raises(RuntimeError, match="a sharded run resumes torch.distributed.checkpoint checkpoints only"):
        trainer.restore()


def test_models_fsdp_cannot_shard_layer_by_layer_and_cpu_offload_on_cpu_are_refused():
    from pyalign.train import TrainingConfig, check_sharding
    from pyalign.train.sharding import decoder_layers

    with pytest.raises(ValueError, match=r"training.sharding: fsdp .* _no_split_modules; Sequential lists none"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"training.cpu_offload: .* this run's device is cpu"):
        check_sharding(TrainingConfig(sharding="fsdp", cpu_offload=True), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"training.cpu_offload: .* it needs training.sharding: fsdp"):
        check_sharding(TrainingConfig(cpu_offload=True), torch.device("cuda"))


def test_an_accelerate_fsdp_launch_means_sharding_fsdp(monkeypatch):
    from pyalign.train import TrainingConfig, check_sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    training = TrainingConfig()
    check_sharding(training, torch.device("cpu"))
    assert training.sharding == "fsdp" and not training.cpu_offload


def test_the_recorded_config_says_what_an_accelerate_fsdp_launch_ran(monkeypatch, tmp_path):
    # config.json must record the sharding the run adopted from the launcher, not the file's "none".
    from pyalign.tasks.sft.config import SFTConfig
    from pyalign.train.startup import start_run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    config = SFTConfig.model_validate({"model": {"path": str(tmp_path)}, "data": {"train": str(tmp_path / "t.jsonl")},
                                       "output_dir": str(tmp_path / "run"), "training": {"device": "cpu"}})
    assert config.training.sharding == "none"
    start_run(config)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["task"] == "sft" and recorded["training"]["sharding"] == "fsdp"
