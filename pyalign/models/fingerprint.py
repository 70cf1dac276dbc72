"""The identity of a model folder: a hash of its config and weight files, so a changed or replaced
model is detected (caches and finished stages key on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_fingerprint(path: str | Path) -> str:
    """blake2b over the config and weight files of a model folder (names and bytes), so a
    changed or replaced model is detected. Tokenizer files are covered by the tokenisation key."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ValueError(f"model.path: no weight files in {path}")
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
