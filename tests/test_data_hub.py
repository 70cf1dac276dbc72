"""Hub data sets with the network really unreachable: a cached one loads, a missing one fails in
seconds with an error naming it and how to provide it locally, never a hang.

Each case runs in a fresh process because ``datasets`` and ``huggingface_hub`` read
``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` when they are imported. The time is measured inside that
process around the load call (importing torch and datasets takes a few seconds on its own)."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys, time
from pyalign.data import load_source
results = []
for source in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        loaded = load_source(source)
        results.append({"ok": True, "pairs": len(loaded.pairs), "seconds": time.monotonic() - start})
    except Exception as error:
        results.append({"ok": False, "type": type(error).__name__, "error": str(error),
                        "seconds": time.monotonic() - start})
print(json.dumps(results))
"""


def run_loads(sources, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYALIGN_HUB"))}
    environment.update(env)
    process = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(sources)], cwd=REPO, env=environment,
                             capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr[-2000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def cache_as_hub_download(cache: Path, repo_id: str, config_id: str, split_files: dict) -> None:
    """Lay out ``cache`` as ``datasets.load_dataset(repo_id)`` leaves it after a download: the
    Arrow files are prepared by datasets' own JSON builder, then moved to the hub data set's
    place (``<namespace>___<name>/<config id>/<version>/<hash>``)."""
    from datasets.data_files import DataFilesDict
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)  # as the hub loader names it
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name, hash="0123456789abcdef",
                   data_files=DataFilesDict.from_patterns({k: [str(v)] for k, v in split_files.items()}))
    builder.download_and_prepare()
    (built,) = glob.glob(str(cache / "build" / name / "*"))
    target = cache / f"{namespace}___{name}" / config_id
    target.parent.mkdir(parents=True)
    shutil.move(built, target)
    shutil.rmtree(cache / "build")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hub(name, cache, **extra):
    return {"name": name, "cache_dir": str(cache), **extra}


def test_offline_mode_uses_the_cache_and_fails_fast_naming_the_data_set(tmp_path):
    cache = tmp_path / "datasets"
    cache_as_hub_download(cache, "Anthropic/hh-rlhf", "default-data_dir=harmless-base",
                          {"train": FIXTURES / "hh_rlhf" / "harmless-base" / "train.jsonl.gz"})
    results = run_loads([hub("Anthropic/hh-rlhf", cache, data_dir="harmless-base"),
                         hub("PKU-Alignment/PKU-SafeRLHF", cache, dimension="harmless")], HF_HUB_OFFLINE="1")
    cached, missing = results
    assert cached["ok"] and cached["pairs"] == 2, cached
    assert not missing["ok"] and missing["type"] == "HubDatasetUnavailable"
    assert missing["seconds"] < 5, missing
    message = missing["error"]
    assert "PKU-Alignment/PKU-SafeRLHF" in message and "offline mode is on" in message
    assert "save_to_disk" in message and "path: DIR" in message


def test_unreachable_endpoint_fails_within_seconds(tmp_path):
    """No offline flag: the hub address refuses connections (a closed port)."""
    results = run_loads([hub("PKU-Alignment/PKU-SafeRLHF", tmp_path / "datasets", dimension="helpful")],
                        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    (missing,) = results
    assert not missing["ok"] and missing["type"] == "HubDatasetUnavailable"
    assert missing["seconds"] < 5, missing
    assert "cannot connect to http://127.0.0.1" in missing["error"] and "save_to_disk" in missing["error"]


def test_silent_endpoint_is_bounded_by_the_probe_timeout(tmp_path):
    """The hub address accepts the connection and never answers (packets silently dropped
    further on): plain ``datasets.load_dataset`` waited > 400 s here; pyalign gives up after
    ``$PYALIGN_HUB_TIMEOUT`` seconds and serves the cached copy, or fails."""
    cache = tmp_path / "datasets"
    cache_as_hub_download(cache, "nvidia/HelpSteer2", "default", {"train": FIXTURES / "helpsteer2" / "train.jsonl.gz"})
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # completes TCP handshakes from the backlog; never accepts or answers
        results = run_loads([hub("nvidia/HelpSteer2", cache, dimension="helpfulness"),
                             hub("PKU-Alignment/PKU-SafeRLHF", cache, dimension="helpful")],
                            HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", PYALIGN_HUB_TIMEOUT="1")
    cached, missing = results
    assert cached["ok"] and cached["pairs"] == 3 and cached["seconds"] < 6, cached
    assert not missing["ok"] and missing["seconds"] < 6, missing
    assert "no answer from http://127.0.0.1" in missing["error"] and "within 1 s" in missing["error"]


def test_bad_probe_timeout_is_named():
    from pyalign.data.hub import probe_timeout

    os.environ["PYALIGN_HUB_TIMEOUT"] = "soon"
    try:
        with pytest.raises(ValueError, match=r"\$PYALIGN_HUB_TIMEOUT: expected seconds"):
            probe_timeout()
    finally:
        del os.environ["PYALIGN_HUB_TIMEOUT"]
