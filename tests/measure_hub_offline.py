"""Hub loading times with the network unreachable: the scenarios of tests/test_data_hub.py, timed.

    python tests/measure_hub_offline.py       # the table in docs/data.md

Each line: seconds of the load call alone, a cached set and a missing one each in a fresh
process, and the whole processes (imports included).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_data_hub import FIXTURES, SCRIPT, cache_as_hub_download, free_port  # noqa: E402


def run(sources, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYALIGN_HUB"))}
    environment.update(env)
    start = time.monotonic()
    process = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(sources)], env=environment, cwd=HERE.parent,
                             capture_output=True, text=True, timeout=600, check=True)
    return json.loads(process.stdout.strip().splitlines()[-1]), time.monotonic() - start


def main() -> None:
    cache = Path(tempfile.mkdtemp(prefix="hub_offline_")) / "datasets"
    cache_as_hub_download(cache, "Anthropic/hh-rlhf", "default-data_dir=harmless-base",
                          {"train": FIXTURES / "hh_rlhf" / "harmless-base" / "train.jsonl.gz"})
    cached = {"name": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "cache_dir": str(cache)}
    missing = {"name": "PKU-Alignment/PKU-SafeRLHF", "dimension": "helpful", "cache_dir": str(cache)}

    def report(label, **env):  # each in its own process, so each pays for its own probe
        (hit,), wall_hit = run([cached], **env)
        (miss,), wall_miss = run([missing], **env)
        assert hit["ok"] and not miss["ok"], (hit, miss)
        print(f"{label}: cached set loads in {hit['seconds']:.2f} s; missing set fails in {miss['seconds']:.2f} s "
              f"({miss['type']}); whole processes {wall_hit:.1f} s / {wall_miss:.1f} s")

    report("HF_HUB_OFFLINE=1", HF_HUB_OFFLINE="1")
    report("closed port", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    with socket.socket() as silent:  # accepts connections from its backlog, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        for timeout in ("1", "5"):
            report(f"silent endpoint, PYALIGN_HUB_TIMEOUT={timeout}",
                   HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", PYALIGN_HUB_TIMEOUT=timeout)


if __name__ == "__main__":
    main()
