"""Every I/O failure and every bad value is one line naming the file, exit status 2, and nothing
half-written that a later run would trust (docs/training.md, "Failure modes").

The file-system faults are real: a size-limited tmpfs and a read-only bind mount in a private
mount namespace (``unshare -m``), and permission bits enforced by dropping root's capability to
override them (``setpriv``); one child process runs every such case. The rest runs ``pyalign``'s
``main`` in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_tiny_lm import (
    WORDS, make_model, make_pairs, make_tokenizer, one_thread, save_tiny_model, tiny_sft_config,
    write_jsonl, write_sft_rows,
)
from pyalign.cli import main

REPO = Path(__file__).resolve().parents[1]
single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model(root / "pi0")
    sft = write_sft_rows(root / "sft.jsonl", 6, seed=7)
    pairs = write_jsonl(root / "pairs.jsonl", make_pairs(6, seed=8))
    return root, model, sft, pairs


def sft_config(assets, output_dir, **training) -> dict:
    _, model, sft, _ = assets
    return tiny_sft_config(model, sft, output_dir, **{"save_every": 1, **training})


def preference_config(assets, output_dir, train=None) -> dict:
    _, model, _, pairs = assets
    return {"model": {"path": str(model)}, "rounds": [{"name": "helpful", "train": train or str(pairs)}],
            "training": {"epochs": 1, "batch_size": 2, "max_length": 32, "max_prompt_length": 16,
                         "progress_bar": False, "tensorboard": False, "device": "cpu"},
            "output_dir": str(output_dir)}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def one_error_line(err: str, command: str = "train") -> str:
    """The error line pyalign printed: exactly one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"pyalign {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


def train(config_file, capsys, *extra) -> tuple[int, str]:
    status = main(["train", str(config_file), "--no-progress", *extra])
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------- bad values

def test_bad_values_are_refused_in_one_line_before_anything_runs(assets, tmp_path, capsys):
    config = sft_config(assets, tmp_path / "out")
    cases = [
        ({"training": {**config["training"], "seed": 2**70}}, r"training\.seed: expected an integer in \[0, 2\*\*32\)"),
        ({"training": {**config["training"], "epochs": 10**12}},
         r"training\.epochs: 1000000000000 epochs make at least as many optimizer steps, above training\.step_limit"),
    ]
    for change, message in cases:
        status, err = train(write_config(tmp_path / "c.yaml", {**config, **change}), capsys)
        assert status == 2
        assert __import__("re").search(message, one_error_line(err)), err
        assert not (tmp_path / "out").exists()  # refused before the output folder was made
    # the exact step count is checked once the data is read: 6 examples / 2 = 3 steps per epoch
    status, err = train(write_config(tmp_path / "c.yaml", sft_config(assets, tmp_path / "out", epochs=2,
                                                                     step_limit=5)), capsys)
    assert status == 2
    assert "training.epochs: 2 epochs x 3 optimizer steps per epoch = 6 steps, above training.step_limit (5)" in \
        one_error_line(err)


def test_duplicate_keys_and_non_utf8_config_are_refused(assets, tmp_path, capsys):
    file = tmp_path / "dup.yaml"
    file.write_text(yaml.safe_dump(sft_config(assets, tmp_path / "out")) + "output_dir: elsewhere\n")
    status, err = train(file, capsys)
    assert status == 2
    line = one_error_line(err)
    assert f"{file}: line " in line and "duplicate key 'output_dir' (first given on line" in line
    file.write_bytes(b"task: sft\nmodel: {path: caf\xe9}\n")
    status, err = train(file, capsys)
    assert status == 2 and f"{file}: not UTF-8 text (byte offset 27: 0xe9)" in one_error_line(err)


def test_non_utf8_data_names_the_line_and_the_byte(assets, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    config = sft_config(assets, tmp_path / "out")
    config["data"]["train"] = str(data)
    status, err = train(write_config(tmp_path / "c.yaml", config), capsys)
    assert status == 2
    offset = data.read_bytes().index(b"\xff")
    assert f"{data}:2: not UTF-8 text (byte offset {offset}: 0xff)" in one_error_line(err)


def test_output_dir_that_is_a_file(assets, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    status, err = train(write_config(tmp_path / "c.yaml", sft_config(assets, tmp_path / "out")), capsys)
    assert status == 2
    assert f"output_dir: {tmp_path / 'out'} is a file, expected a folder" in one_error_line(err)


def test_degenerate_pairs_are_refused_or_skipped_and_counted(assets, tmp_path, capsys, caplog):
    rows = make_pairs(4, seed=1)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["chosen"] = "  "
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    status, err = train(write_config(tmp_path / "c.yaml", preference_config(assets, tmp_path / "out", str(data))),
                        capsys)
    assert status == 2
    assert (f"{data}:2 (row 1): fields 'chosen' and 'rejected' are the same text (the pair prefers nothing) "
            "(on_bad_row: skip skips such rows)") in one_error_line(err)
    from pyalign.data import load_source

    loaded = load_source({"path": str(data), "on_bad_row": "skip"})
    assert len(loaded.pairs) == 2
    assert [(index, field) for index, field, _ in loaded.report.skipped] == [(1, "rejected"), (2, "chosen")]
    assert "2 bad rows skipped" in loaded.report.summary()


def test_token_ids_beyond_the_vocabulary_name_the_row_and_the_id(assets, tmp_path, capsys):
    tokenizer = make_tokenizer()
    small = make_model(len(tokenizer) - 4)  # the tokenizer's last 4 words have no embedding
    small.save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    rows = [{"prompt": "the cat", "response": "a dog"}, {"prompt": "the cat", "response": f"we {WORDS[-1]}"}]
    config = sft_config(assets, tmp_path / "out")
    config["model"]["path"] = str(tmp_path / "small")
    config["data"]["train"] = str(write_jsonl(tmp_path / "sft.jsonl", rows))
    status, err = train(write_config(tmp_path / "c.yaml", config), capsys)
    assert status == 2
    assert (f"{tmp_path / 'sft.jsonl'}: row 1: token id {len(tokenizer) - 1} is beyond the model's vocabulary "
            f"({len(tokenizer) - 4} token embeddings)") in one_error_line(err)
    pairs = [{"prompt": "the cat", "chosen": f"big {WORDS[-2]}", "rejected": "a dog"}]
    config = preference_config(assets, tmp_path / "pref", str(write_jsonl(tmp_path / "p.jsonl", pairs)))
    config["model"]["path"] = str(tmp_path / "small")
    status, err = train(write_config(tmp_path / "p.yaml", config), capsys)
    assert status == 2  # refused before the frozen model runs over the pairs
    assert f"row 0 (chosen): token id {len(tokenizer) - 2} is beyond" in one_error_line(err)


def test_damaged_state_json_names_the_file(assets, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", sft_config(assets, tmp_path / "out"))
    assert train(config, capsys)[0] == 0
    (tmp_path / "out" / "state.json").write_text("")
    status, err = train(config, capsys)
    assert status == 2
    assert (f"{tmp_path / 'out' / 'state.json'}: damaged: not valid JSON (Expecting value at line 1 column 1); "
            "delete") in one_error_line(err)


# ----------------------------------------------------------------------------- the file system, for real

SCENARIOS = r'''
import json, os, shutil, sys, io, contextlib
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from pyalign.cli import main

spec = json.loads(Path(sys.argv[1]).read_text())
results = {}

def run(name, config, *extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["train", config, "--no-progress", *extra])
    results[name] = {"status": status, "err": err.getvalue()}

for size, mount in spec["full"].items():
    run(f"full_{size}", spec["config"], "--output-dir", f"{mount}/out")
    results[f"full_{size}"]["left"] = sorted(str(p.relative_to(mount)) for p in Path(mount).rglob("*")
                                             if ".partial" in p.name)
    again = Path(spec["big"]) / f"out_{size}"
    shutil.copytree(f"{mount}/out", again, symlinks=True)
    run(f"again_{size}", spec["config"], "--output-dir", str(again))
run("ro_finished", spec["config"], "--output-dir", spec["ro"])
run("ro_new", spec["config"], "--output-dir", spec["ro"] + "/new")
run("unreadable_config", spec["unreadable_config"])
run("unreadable_data", spec["unreadable_data_config"])
run("unwritable_output", spec["config"], "--output-dir", spec["unwritable"])
run("unreadable_model", spec["unreadable_model_config"])
Path(spec["results"]).write_text(json.dumps(results))
'''
# each of the first three runs out at another write (checkpoint of step 1, of step 2, merged model);
# the last has room for the whole run
FULL_SIZES = ("8k", "40k", "120k", "4m")


def have_namespaces() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt && "
                            "setpriv --bounding-set=-dac_override true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare")
                    or not shutil.which("setpriv") or not have_namespaces(),
                    reason="needs root and a private mount namespace (unshare -m) for a real tmpfs and mounts")
def test_disk_full_read_only_and_permission_denied_for_real(assets, tmp_path):
    config = write_config(tmp_path / "c.yaml", sft_config(assets, tmp_path / "unused"))
    ro = tmp_path / "ro"  # a finished run, mounted read-only below over itself
    assert main(["train", str(config), "--no-progress", "--output-dir", str(ro)]) == 0
    unreadable = write_config(tmp_path / "unreadable.yaml", sft_config(assets, tmp_path / "x"))
    unreadable.chmod(0)
    data = tmp_path / "locked.jsonl"
    shutil.copy(assets[2], data)
    data.chmod(0)
    locked = sft_config(assets, tmp_path / "y")
    locked["data"]["train"] = str(data)
    unwritable = tmp_path / "unwritable"
    unwritable.mkdir(mode=0o555)
    model = tmp_path / "model"
    shutil.copytree(assets[1], model)
    (model / "model.safetensors").chmod(0)
    locked_model = sft_config(assets, tmp_path / "z")
    locked_model["model"]["path"] = str(model)
    mounts = {size: tmp_path / f"full_{size}" for size in FULL_SIZES}
    (tmp_path / "big").mkdir()
    spec = {"config": str(config), "full": {k: str(v) for k, v in mounts.items()}, "big": str(tmp_path / "big"),
            "ro": str(ro), "unreadable_config": str(unreadable),
            "unreadable_data_config": str(write_config(tmp_path / "locked.yaml", locked)),
            "unwritable": str(unwritable / "out"), "results": str(tmp_path / "results.json"),
            "unreadable_model_config": str(write_config(tmp_path / "locked_model.yaml", locked_model))}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "scenarios.py").write_text(SCENARIOS)
    shell = " && ".join(
        [f"mkdir -p {m} && mount -t tmpfs -o size={size} tmpfs {m}" for size, m in mounts.items()]
        + [f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}",
           # root without the capabilities that override permission bits: chmod 0 is enforced
           f"exec setpriv --bounding-set=-dac_override,-dac_read_search,-fowner {sys.executable} "
           f"{tmp_path / 'scenarios.py'} {tmp_path / 'spec.json'} {REPO / 'tests'}"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    *small, roomy = FULL_SIZES
    assert results[f"full_{roomy}"]["status"] == 0, results[f"full_{roomy}"]["err"][-3000:]
    expected = load_file(str(tmp_path / "big" / f"out_{roomy}" / "model" / "model.safetensors"))
    failed_at = set()
    for size in small:
        full = results[f"full_{size}"]
        assert full["status"] == 2, (size, full["err"][-3000:])
        line = one_error_line(full["err"])
        assert "no space left on the device: free some" in line, line
        failed_at.add(line.split("/out/")[-1].split(": no space")[0])
        assert full["left"] == [], size  # no partial file or folder stays behind
        # the folder moved to a disk with room: the run resumes from what it trusts and ends, bit for
        # bit, as the run that never ran out of space
        assert results[f"again_{size}"]["status"] == 0, results[f"again_{size}"]["err"][-3000:]
        again = load_file(str(tmp_path / "big" / f"out_{size}" / "model" / "model.safetensors"))
        assert all(torch.equal(again[k], v) for k, v in expected.items()), size
    assert len(failed_at) == len(small), failed_at  # each size ran out at another write
    assert results["ro_finished"]["status"] == 0, results["ro_finished"]["err"][-3000:]
    assert results["ro_new"]["status"] == 2
    assert f"{ro}/new: read-only file system" in one_error_line(results["ro_new"]["err"])
    assert results["unreadable_config"]["status"] == 2
    assert f"{unreadable}: permission denied" in one_error_line(results["unreadable_config"]["err"])
    assert results["unreadable_data"]["status"] == 2
    assert f"{data}: permission denied" in one_error_line(results["unreadable_data"]["err"])
    assert results["unwritable_output"]["status"] == 2
    assert f"{unwritable / 'out'}: permission denied" in one_error_line(results["unwritable_output"]["err"])
    assert results["unreadable_model"]["status"] == 2
    assert f"{model / 'model.safetensors'}: permission denied" in one_error_line(results["unreadable_model"]["err"])
