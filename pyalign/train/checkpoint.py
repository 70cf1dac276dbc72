"""Atomic training checkpoints of one round.

Layout under ``<round_dir>/checkpoints``::

    step_000040/state.pt     trainable weights, optimizer, scheduler, objective state, progress
    latest.json              {"step": 40, "dir": "step_000040"}

A checkpoint is written into ``.partial_step_000040``, renamed to ``step_000040`` (a new name, so
the rename is atomic), and only then is ``latest.json`` replaced (atomic too). A run killed at
any moment therefore leaves ``latest.json`` pointing at a complete checkpoint or at none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pyalign.io import write_json_atomic


def save_checkpoint(directory: str | Path, step: int, state: dict, *, keep: int = 1) -> Path:
    """Write ``state`` (anything ``torch.save`` takes) as the checkpoint of ``step``; keep the
    ``keep`` newest checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    for leftover in directory.glob(".partial_*"):  # from runs killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    partial = directory / f".partial_{name}"
    partial.mkdir()
    torch.save(state, partial / "state.pt")
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)  # a leftover of a run killed after this very rename
    os.replace(partial, final)
    write_json_atomic(directory / "latest.json", {"step": step, "dir": name})
    older = sorted(p for p in directory.glob("step_*") if p.is_dir() and p.name != name)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_step(directory: str | Path) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    pointer = Path(directory) / "latest.json"
    return json.loads(pointer.read_text(encoding="utf-8"))["step"] if pointer.is_file() else None


def load_latest_checkpoint(directory: str | Path) -> dict | None:
    """The state of the newest complete checkpoint, or None."""
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text(encoding="utf-8"))
    # weights_only=False: the file holds Python RNG state tuples and optimizer dicts written by
    # this very module into the run's own output directory.
    return torch.load(Path(directory) / latest["dir"] / "state.pt", map_location="cpu", weights_only=False)
