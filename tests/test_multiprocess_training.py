"""Training with 2 real CPU processes (gloo) against 1 process with the same global batch.

- the trainer under ``torch.multiprocessing`` (SFT): the same per-step losses, gradient norms,
  eval metrics and final weights as one process, with a rank whose micro-batch has every label
  ignored and a rank with no example at all in a step; checkpoints written by rank 0 only;
- the SPO driver under ``torchrun``: the frozen log-prob stage split over the ranks and written
  once by rank 0; the run killed mid-round, then resumed by ONE process, which reuses the
  2-process cache (keys do not depend on the number of processes) and the 2-process checkpoint,
  and ends where an uninterrupted 1-process run ends;
- ``accelerate launch`` running ``pyalign train`` on an SFT config (one summary printed);
- launches that would not do what they say are refused (FSDP, DeepSpeed, accelerate --cpu).

Run as a script, this file is the torchrun worker (``--sequential-worker CONFIG OUT``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_processes import free_port  # noqa: E402
from helpers_tiny_lm import (  # noqa: E402
    Crash,
    make_model,
    make_pairs,
    make_tokenizer,
    random_sentence,
    save_tiny_model,
    write_jsonl,
)

from pyalign import distributed  # noqa: E402
from pyalign.data import IGNORE_INDEX  # noqa: E402
from pyalign.models import apply_lora  # noqa: E402
from pyalign.tasks.sft.data import SFTDataset, SFTExample  # noqa: E402
from pyalign.train import LoraConfig, TrainingConfig  # noqa: E402
from pyalign.train.objectives import SFTObjective  # noqa: E402
from pyalign.train.trainer import Trainer  # noqa: E402

TOLERANCE = dict(atol=1e-6, rtol=1e-5)




def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def sft_examples(n, seed):
    rng = random.Random(seed)
    return [SFTExample(random_sentence(rng, 2, 7), random_sentence(rng, 1, 9)) for _ in range(n)]


class MaskedResponses:
    """SFT data in which some examples have every label ignored."""

    def __init__(self, dataset, masked):
        self.dataset, self.masked = dataset, set(masked)

    def __len__(self):
        return len(self.dataset)

    def batch(self, indices):
        batch = self.dataset.batch(indices)
        for row, index in enumerate(indices):
            if index in self.masked:
                batch["labels"][row] = IGNORE_INDEX
        return batch


def sft_trainer(run_dir, device="cpu"):
    """The same trainer in every process: 7 examples, micro-batches of 3, 2 per step, so step 1
    of each epoch is one example (rank 1 of 2 gets none); in step 0 the example rank 1 gets in
    the first micro-batch has every label ignored."""
    tokenizer = make_tokenizer()
    train = SFTDataset(sft_examples(7, seed=4), tokenizer, 32, 16)
    held_out = SFTDataset(sft_examples(5, seed=5), tokenizer, 32, 16)
    model = apply_lora(make_model(len(tokenizer), seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give A a gradient from the first step
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.to(device)
    config = TrainingConfig(lr=1e-2, epochs=2, batch_size=3, grad_accum=2, eval_batch_size=2, max_length=32,
                            max_prompt_length=16, warmup_ratio=0.0, save_every=1, log_every=1,
                            progress_bar=False, tensorboard=False, seed=0)
    probe = Trainer(model, SFTObjective(), train, config, run_dir)
    masked = probe.micro_batches_of_step(0)[0][1::2].tolist()  # rank 1's share of the first micro-batch
    return Trainer(model, SFTObjective(), MaskedResponses(train, masked), config, run_dir, eval=held_out), masked


def train_recording_saves(trainer):
    import pyalign.train.trainer as trainer_module

    saves, original = [], trainer_module.save_checkpoint

    def spy(directory, step, state, **kwargs):
        saves.append(step)
        return original(directory, step, state, **kwargs)

    trainer_module.save_checkpoint = spy
    try:
        result = trainer.train()
    finally:
        trainer_module.save_checkpoint = original
    return result, saves


def _sft_worker(rank, world, port, out_dir, device="cpu"):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = distributed.process_device(device)
    assert distributed.init_from_env(device)
    trainer, _ = sft_trainer(Path(out_dir) / "run", device)
    batches = [len(trainer.this_process(m)) for s in range(trainer.total_steps) for m in trainer.micro_batches_of_step(s)]
    result, saves = train_recording_saves(trainer)
    params = {name: p.detach().cpu().clone() for name, p in trainer.params.items()}
    torch.save({"result": result, "saves": saves, "params": params, "batches": batches},
               Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_processes_train_like_one_with_an_ignored_and_an_empty_micro_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    single, masked = sft_trainer(tmp_path / "single")
    expected, single_saves = train_recording_saves(single)
    assert len(masked) == 1 and single_saves == [1, 2, 3, 4]

    mp.spawn(_sft_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # rank 1 trained on 1 + 1 | 0 examples per step of an epoch (its first one all ignored): it
    # had no example in step 1's micro-batch, yet neither rank waited forever
    assert ranks[0]["batches"] == [2, 2, 1] * 2 and ranks[1]["batches"] == [1, 1, 0] * 2
    assert ranks[0]["saves"] == [1, 2, 3, 4] and ranks[1]["saves"] == []  # rank 0 writes checkpoints
    got = ranks[0]["result"]
    assert len(got["history"]) == len(expected["history"]) == 4
    for step_two, step_one in zip(got["history"], expected["history"]):
        assert step_two.keys() == step_one.keys()
        for name in step_one.keys() - {"step_s"}:  # all but the wall time
            assert step_two[name] == pytest.approx(step_one[name], rel=1e-5, abs=1e-6), (step_one["step"], name)
    for name in expected["eval"]:
        assert got["eval"][name] == pytest.approx(expected["eval"][name], rel=1e-5), name
    for name, param in single.params.items():
        assert torch.allclose(ranks[0]["params"][name], param, **TOLERANCE), name
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name  # replicas agree
    def without_time(history):
        return [{k: v for k, v in entry.items() if k != "step_s"} for entry in history]
    assert without_time(ranks[1]["result"]["history"]) == without_time(got["history"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with 2 processes needs 2 CUDA devices")
def test_two_gpus_with_nccl_train_like_one(tmp_path):
    import torch.multiprocessing as mp

    single, _ = sft_trainer(tmp_path / "single", "cuda:0")
    expected, _ = train_recording_saves(single)
    mp.spawn(_sft_worker, args=(2, free_port(), str(tmp_path), "cuda"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for step_two, step_one in zip(ranks[0]["result"]["history"], expected["history"]):
        assert step_two["loss"] == pytest.approx(step_one["loss"], rel=1e-4)
    for name, param in single.params.items():
        assert torch.allclose(ranks[0]["params"][name], param.cpu(), atol=1e-5, rtol=1e-4), name
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


# ----------------------------------------------------------------------------- the SPO driver under torchrun

def spo_config(root: Path, output_dir: Path) -> dict:
    model = save_tiny_model(root / "pi0", seed=0) if not (root / "pi0").exists() else root / "pi0"
    rounds = []
    for i, marker in enumerate(["bright", "cold"]):
        train = write_jsonl(root / f"train{i}.jsonl", make_pairs(9, seed=30 + i, marker=marker))
        held_out = write_jsonl(root / f"eval{i}.jsonl", make_pairs(4, seed=40 + i, marker=marker))
        rounds.append({"name": f"dim{i}", "train": str(train), "eval": str(held_out)})
    return {
        "model": {"path": str(model)},
        "lora": {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "method": {"loss": "spo", "alpha": 0.3, "beta": 0.1},
        "rounds": rounds,
        "training": {"lr": 5e-3, "epochs": 2, "batch_size": 2, "grad_accum": 2, "eval_batch_size": 3,
                     "max_length": 32, "max_prompt_length": 16, "warmup_ratio": 0.2, "save_every": 2,
                     "log_every": 1, "progress_bar": False, "tensorboard": False, "device": "cpu"},
        "output_dir": str(output_dir),
    }


def _sequential_worker(config_file: str, out_dir: str) -> None:
    """torchrun worker: the SPO run, killed (on every rank) at round 2 step 3."""
    import pyalign.train.trainer as trainer_module
    from pyalign.tasks.preference.rounds import run_sequential

    torch.set_num_threads(1)
    events, saves = [], []
    original = trainer_module.save_checkpoint

    def spy(directory, step, state, **kwargs):
        saves.append(step)
        return original(directory, step, state, **kwargs)

    trainer_module.save_checkpoint = spy

    def callback(event, info):
        events.append([event, {k: v for k, v in info.items() if k in ("model", "round", "split", "pairs", "step")}])
        if event == "step" and info["round"] == 2 and info["step"] == 3:
            raise Crash

    config = json.loads(Path(config_file).read_text())
    try:
        run_sequential(config, callback=callback)
    except Crash:
        pass
    rank = distributed.rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"events": events, "saves": saves,
                                                             "world": distributed.world_size()}))
    distributed.shutdown()


def recorder(events):
    return lambda event, info: events.append((event, {k: v for k, v in info.items()
                                                      if k in ("model", "round", "split", "pairs", "step")}))


def test_spo_under_torchrun_shards_the_frozen_stage_then_one_process_resumes(tmp_path):
    from safetensors.torch import load_file

    from pyalign.tasks.preference.rounds import run_sequential

    torch.set_num_threads(1)
    straight_config = spo_config(tmp_path, tmp_path / "straight")
    straight = run_sequential(straight_config)

    config = spo_config(tmp_path, tmp_path / "run")
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, "--sequential-worker", str(config_file), str(tmp_path)],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # the frozen stage: each rank ran its share of every data set, rank 0 alone wrote the entries
    for rank, share in ((0, {"train": 5, "eval": 2}), (1, {"train": 4, "eval": 2})):
        computed = [info for event, info in ranks[rank]["events"] if event == "logprobs_computed"]
        assert sorted((i["model"], i["round"], i["split"]) for i in computed) == sorted(
            (m, r, s) for m, r in ((0, 1), (0, 2), (1, 2)) for s in ("train", "eval"))
        assert all(i["pairs"] == share[i["split"]] for i in computed)
    assert len([1 for e, _ in ranks[0]["events"] if e == "cache_saved"]) == 6
    assert not any(e == "cache_saved" for e, _ in ranks[1]["events"])
    # checkpoints: rank 0 only (round 1: steps 2, 4 and the last, 6; round 2: step 2)
    assert ranks[0]["saves"] == [2, 4, 6, 2] and ranks[1]["saves"] == []
    # every rank logged the same global step losses
    steps = [[i for e, i in r["events"] if e == "step"] for r in ranks]
    assert steps[0] == steps[1] and steps[0][-1] == {"round": 2, "step": 3}

    # round 1 as trained by 2 processes vs 1 process: the same losses
    two = json.loads((tmp_path / "run" / "round_1_dim0" / "metrics.json").read_text())
    one = straight.metrics[0]
    for a, b in zip(two["history"], one["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name in one["eval"]:  # eval batches split over the ranks (4 pairs, batches of 3)
        assert two["eval"][name] == pytest.approx(one["eval"][name], rel=1e-5, abs=1e-6), name
    # the 2-process cache holds the 1-process values (to float tolerance) under the same key
    # (pi_1's entries differ in the model fingerprint only: pi_1's weights differ in the last bits)
    for entry in ("model_0/round_2_train.pt", "model_1/round_2_eval.pt"):
        a = torch.load(tmp_path / "run" / "logprob_cache" / entry, weights_only=True)
        b = torch.load(tmp_path / "straight" / "logprob_cache" / entry, weights_only=True)
        assert {k for k in a["key"] if a["key"][k] != b["key"][k]} <= ({"model_fingerprint"} if "model_1" in entry else set())
        for side in ("chosen", "rejected"):
            assert torch.allclose(a[side], b[side], atol=1e-4, rtol=1e-6)

    events = []
    resumed = run_sequential(config, callback=recorder(events))  # one process, same output_dir
    assert not any(e in ("cache_saved", "logprobs_computed") for e, _ in events)  # nothing recomputed
    assert [i["step"] for e, i in events if e == "step"] == [3, 4, 5, 6]  # from the 2-process checkpoint
    expected = load_file(str(straight.final_model_dir / "model.safetensors"))
    got = load_file(str(resumed.final_model_dir / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=1e-5), name
    assert resumed.metrics[-1]["eval"]["loss"] == pytest.approx(straight.metrics[-1]["eval"]["loss"], rel=1e-4)


# ----------------------------------------------------------------------------- accelerate launch, refusals

def test_accelerate_launch_runs_pyalign_train_on_two_processes(tmp_path):
    model = save_tiny_model(tmp_path / "base")
    rng = random.Random(6)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": random_sentence(rng, 2, 6), "response": random_sentence(rng)}
                                                  for _ in range(8)])
    config = {"task": "sft", "model": {"path": str(model)}, "data": {"train": str(train), "eval": str(train)},
              "lora": {"r": 4}, "output_dir": str(tmp_path / "out"),
              "training": {"lr": 1e-2, "epochs": 1, "batch_size": 4, "max_length": 32, "max_prompt_length": 16,
                           "save_every": 1, "log_every": 1, "progress_bar": False, "tensorboard": False}}
    file = tmp_path / "sft.json"
    file.write_text(json.dumps(config))  # YAML is a superset of JSON
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "pyalign", "train", str(file), "--device", "cpu"],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("model: ") == 1  # the summary comes from rank 0 only
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(saved["history"]) == 2 and saved["eval"]["loss"] > 0


@pytest.mark.parametrize("variables, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"FSDP_VERSION: accelerate was configured for FSDP version 1"),
    ({"ACCELERATE_USE_DEEPSPEED": "True"}, r"ACCELERATE_USE_DEEPSPEED: DeepSpeed"),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
     r"accelerate launch --cpu --num_processes N` started a single process"),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "OMPI_COMM_WORLD_SIZE": "2"}, r"under mpirun"),
])
def test_launches_pyalign_does_not_implement_are_refused(monkeypatch, variables, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_env("cpu")


def test_cuda_device_of_each_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device("cuda") == torch.device("cuda", 1)
    assert distributed.process_device("cuda:0") == torch.device("cuda", 0)  # an explicit index stays
    assert distributed.process_device("cpu") == torch.device("cpu")


if __name__ == "__main__":
    if sys.argv[1] == "--sequential-worker":
        _sequential_worker(sys.argv[2], sys.argv[3])
