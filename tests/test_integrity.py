"""What a resume or a skip trusts is checked first (docs/training.md, "Failure modes").

- a checkpoint with changed bytes, cut short or empty is skipped for the previous complete one
  (``keep_checkpoints: 2``), and the resumed run ends with the uninterrupted run's weights bit for
  bit; with no previous one the run stops naming the file; a damaged ``latest.json`` falls back to
  the newest folder that checks out; the same for distributed (DCP) checkpoints;
- a log-prob cache entry with changed bytes or cut short is refused naming it, or recomputed;
- a finished stage whose model folder or state file changed is refused naming it;
- a reward model folder whose files changed does not load;
- JSON state files with a checksum, folder manifests and JSONL row digests catch a changed byte;
  atomic writes leave no partial file and do not rewrite identical bytes.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny_lm import (
    Crash, crash_at, make_pairs, one_thread, save_tiny_model, tiny_sft_config, write_jsonl, write_sft_rows,
)
from pyalign.failures import DamagedFileError
from pyalign.io import (
    JsonlAppender, atomic_write_bytes, read_json, read_jsonl_rows, verify_manifest, write_json_atomic, write_manifest,
)
from pyalign.train import CacheKey, LogprobCache, load_config
from pyalign.train.checkpoint import find_checkpoint

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    model = save_tiny_model(root / "pi0")
    sft = write_sft_rows(root / "sft.jsonl", 8, seed=5)
    pairs = write_jsonl(root / "pairs.jsonl", make_pairs(6, seed=4))
    return root, model, sft, pairs


def sft_config(assets, output_dir, **training) -> dict:
    _, model, sft, _ = assets
    return tiny_sft_config(model, sft, output_dir,
                           **{"epochs": 2, "warmup_ratio": 0.0, "save_every": 1, "log_every": 1, **training})


def run(config, **kwargs):
    from pyalign.tasks.sft import run_sft

    return run_sft(load_config(config), **kwargs)


def weights(output_dir):
    return load_file(str(output_dir / "model" / "model.safetensors"))


def flip_byte(path, position=None):
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if position is None else position
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(sft_config(assets, out, keep_checkpoints=2))
    return weights(out)


# ----------------------------------------------------------------------------- checkpoints

DAMAGE = {
    "flipped": flip_byte,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 3]),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(assets, straight, tmp_path, damage, caplog):
    config = sft_config(assets, tmp_path / "run", keep_checkpoints=2)
    with pytest.raises(Crash):
        run(config, callback=crash_at("step", lambda info: info["step"] == 5))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000003", "step_000004"]
    DAMAGE[damage](checkpoints / "step_000004" / "state.pt")
    steps = []
    with caplog.at_level(logging.WARNING, logger="pyalign.train"):
        run(config, callback=lambda event, info: steps.append(info["step"]) if event == "step" else None)
    assert steps[0] == 4  # trained again from step 3, the previous complete checkpoint
    assert "step_000004: skipped" in caplog.text and "state.pt" in caplog.text
    for name, value in weights(tmp_path / "run").items():
        assert torch.equal(value, straight[name]), name


def test_a_damaged_only_checkpoint_stops_naming_the_file(assets, tmp_path):
    config = sft_config(assets, tmp_path / "run", keep_checkpoints=1)
    with pytest.raises(Crash):
        run(config, callback=crash_at("step", lambda info: info["step"] == 3))
    state = tmp_path / "run" / "checkpoints" / "step_000002" / "state.pt"
    flip_byte(state)
    with pytest.raises(DamagedFileError, match=rf"{state}: damaged: its bytes changed.*keep_checkpoints: 2.*delete "):
        run(config)


def test_a_damaged_latest_pointer_uses_the_newest_complete_checkpoint(assets, tmp_path):
    config = sft_config(assets, tmp_path / "run", keep_checkpoints=2)
    with pytest.raises(Crash):
        run(config, callback=crash_at("step", lambda info: info["step"] == 4))
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest.json").write_text('{"step": 3, "dir": "step_000003", "form')
    found, _ = find_checkpoint(checkpoints)
    assert found.step == 3
    (checkpoints / "latest.json").write_text('{"step": 9, "dir": "step_000003", "format": "torch"}')  # valid JSON
    found, _ = find_checkpoint(checkpoints)
    assert found.step == 3
    # a folder renamed into place whose pointer update never happened is complete: taken too
    (checkpoints / "latest.json").unlink()
    assert find_checkpoint(checkpoints)[0].step == 3


def test_a_damaged_distributed_checkpoint_falls_back(assets, tmp_path, caplog):
    """torch.distributed.checkpoint shards (training.sharding: fsdp, here in one process) carry a
    manifest too: a changed shard is caught before DCP reads it."""
    config = sft_config(assets, tmp_path / "run", keep_checkpoints=2, sharding="fsdp")
    config["lora"] = None
    straight_config = {**config, "output_dir": str(tmp_path / "straight")}
    run(straight_config)
    with pytest.raises(Crash):
        run(config, callback=crash_at("step", lambda info: info["step"] == 4))
    newest = tmp_path / "run" / "checkpoints" / "step_000003"
    assert json.loads((newest / "checksums.json").read_text())["files"]
    shard = sorted(newest.glob("*.distcp"))[0]
    flip_byte(shard)
    with caplog.at_level(logging.WARNING, logger="pyalign.train"):
        run(config)
    assert f"{shard}" in caplog.text
    for name, value in weights(tmp_path / "run").items():
        assert torch.allclose(value, weights(tmp_path / "straight")[name], atol=1e-6), name


# ----------------------------------------------------------------------------- finished stages, models

def test_a_finished_run_whose_model_or_state_changed_is_refused(assets, tmp_path, straight):
    out = tmp_path / "run"
    run(sft_config(assets, out))
    run(sft_config(assets, out))  # finished: skipped
    weights_file = out / "model" / "model.safetensors"
    original = weights_file.read_bytes()
    flip_byte(weights_file)
    with pytest.raises(DamagedFileError, match=rf"{out / 'model'}: damaged: its weights or config differ.*"
                                               rf"delete {out / 'state.json'}"):
        run(sft_config(assets, out))
    weights_file.write_bytes(original)
    state = out / "state.json"
    state.write_text(state.read_text().replace('"finished"', '"finishes"'))
    with pytest.raises(DamagedFileError, match=rf"{state}: damaged: its content differs from the checksum"):
        run(sft_config(assets, out))
    state.write_text("{\"status\": ")
    with pytest.raises(DamagedFileError, match=rf"{state}: damaged: not valid JSON \(Expecting value at line 1"):
        run(sft_config(assets, out))


def test_a_changed_reward_model_folder_does_not_load(assets, tmp_path):
    from helpers_tiny_lm import make_tokenizer

    from pyalign.reward_model import RewardModel, load_reward_model
    from pyalign.reward_model.data import ObjectiveScale
    from pyalign.reward_model.model import load_backbone

    tokenizer = make_tokenizer()
    model = RewardModel(load_backbone(assets[1]), [ObjectiveScale("helpfulness", 0, 4)], tokenizer=tokenizer,
                        offset=torch.zeros(1), spread=torch.ones(1), max_length=32, max_prompt_length=16)
    folder = model.save(tmp_path / "rm")
    load_reward_model(folder)
    flip_byte(folder / "head.safetensors", position=-8)
    with pytest.raises(DamagedFileError, match=r"head.safetensors: damaged: its bytes changed"):
        load_reward_model(folder)


# ----------------------------------------------------------------------------- the log-prob cache

def test_a_damaged_log_prob_cache_entry_is_refused_or_recomputed(tmp_path):
    key = CacheKey(0, "model", 1, "train", "data", {"max_length": 32}, False, "float32")
    cache = LogprobCache(tmp_path)
    path = cache.save(key, torch.tensor([-1.5, -2.25, -3.0]), torch.tensor([-4.0, -5.5, -6.0]))
    assert torch.equal(cache.load(key)[0], torch.tensor([-1.5, -2.25, -3.0]))
    data = bytearray(path.read_bytes())
    position = bytes(data).index(torch.tensor([-1.5, -2.25, -3.0]).numpy().tobytes())  # the stored values
    data[position + 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=rf"{path}: damaged: its values differ.*--recompute-stale-cache"):
        cache.load(key)
    assert LogprobCache(tmp_path, recompute_stale=True).load(key) is None
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=rf"{path}: damaged: cannot be loaded"):
        cache.load(key)


# ----------------------------------------------------------------------------- pyalign.io

def test_json_checksums_manifests_and_partial_files(tmp_path):
    state = write_json_atomic(tmp_path / "state.json", {"fingerprint": {"lr": 0.001}, "status": "finished"},
                              checksum=True)
    assert read_json(state) == {"fingerprint": {"lr": 0.001}, "status": "finished"}
    state.write_text(state.read_text().replace("0.001", "0.002"))  # still valid JSON
    with pytest.raises(DamagedFileError, match="differs from the checksum"):
        read_json(state)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 100)
    (folder / "sub" / "b.bin").write_bytes(b"y" * 10)
    write_manifest(folder)
    verify_manifest(folder, remedy="restore it")
    (folder / "sub" / "b.bin").write_bytes(b"y" * 9)
    with pytest.raises(DamagedFileError, match=r"b.bin: damaged: 9 bytes, 10 were written.*restore it"):
        verify_manifest(folder, remedy="restore it")
    # identical bytes are not rewritten (a finished run reruns on read-only media)
    target = atomic_write_bytes(tmp_path / "same.txt", b"abc")
    before = target.stat().st_mtime_ns, target.stat().st_ino
    atomic_write_bytes(target, b"abc")
    assert (target.stat().st_mtime_ns, target.stat().st_ino) == before
    assert not list(tmp_path.glob("*.partial"))


def test_jsonl_row_digests_redo_a_damaged_row(tmp_path, caplog):
    path = tmp_path / "scored.jsonl"
    with JsonlAppender(path, checksums=True) as out:
        for i in range(4):
            out.write({"index": i, "score": i * 1.5})
    text = path.read_text()
    path.write_text(text.replace('"score": 3.0', '"score": 7.0'))  # row 2 changed, still valid JSON
    with caplog.at_level(logging.WARNING):
        assert [r["index"] for r in read_jsonl_rows(path)] == [0, 1]
    assert "row 3 of 4 does not match its digest" in caplog.text
    with JsonlAppender(path) as out:  # digests beside it: checked and continued
        assert out.count == 2
        out.write({"index": 2, "score": 3.0})
        out.write({"index": 3, "score": 4.5})
    assert read_jsonl_rows(path) == [{"index": i, "score": i * 1.5} for i in range(4)]
    assert path.read_text() == text
