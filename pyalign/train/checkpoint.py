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

from pyalign import distributed
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
    return _publish(directory, partial, step, "torch", keep)


def _publish(directory: Path, partial: Path, step: int, kind: str, keep: int) -> Path:
    """The complete checkpoint in ``partial`` becomes the newest: renamed to its final name (new,
    so the rename is atomic), then ``latest.json`` replaced, then older ones pruned to ``keep``."""
    name = f"step_{step:06d}"
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)  # a leftover of a run killed after this very rename
    os.replace(partial, final)
    write_json_atomic(directory / "latest.json", {"step": step, "dir": name, "format": kind})
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


# ----------------------------------------------------------------------------- sharded (DCP)
# With ``training.sharding: fsdp`` the trained weights and the optimizer state are split over the
# processes, so a checkpoint is written by all of them with torch.distributed.checkpoint: each
# process writes its own shards into ``.partial_step_N`` (DCP's ``.metadata`` last, by process 0),
# process 0 adds ``extra.pt`` (step, scheduler, objective state, history), renames the folder to
# ``step_N`` and only then replaces ``latest.json``: a kill at any moment leaves the pointer on a
# complete checkpoint or on none, as in the single-file format above. DCP stores every tensor's
# global shape and each shard's offsets, so a checkpoint loads under another number of processes
# (or into an unsharded model in one process) and is resharded on load.

EXTRA_FILE = "extra.pt"


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    # Frozen weights (a LoRA's base model) are the base folder's, not the run's: not saved.
    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def save_sharded_checkpoint(directory: str | Path, step: int, model, optimizer, extra: dict, *,
                            keep: int = 1) -> Path:
    """Every process calls this; see the section comment above for the layout and the guarantees."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    directory = Path(directory)
    name = f"step_{step:06d}"
    partial, final = directory / f".partial_{name}", directory / name
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".partial_*"):  # from runs killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()
    distributed.barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(partial))
    if distributed.is_main():
        torch.save(extra, partial / EXTRA_FILE)
        _publish(directory, partial, step, "dcp", keep)
    distributed.barrier()
    return final


def latest_format(directory: str | Path) -> str | None:
    """``"dcp"``, ``"torch"`` (the single-file format) or None when there is no checkpoint."""
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    return json.loads(pointer.read_text(encoding="utf-8")).get("format", "torch")


def read_sharded_progress(directory: str | Path) -> dict:
    """The ``extra`` of the newest sharded checkpoint alone (to check it before loading weights)."""
    latest = json.loads((Path(directory) / "latest.json").read_text(encoding="utf-8"))
    # weights_only=False: Python RNG tuples and history dicts written by this module into the
    # run's own output directory.
    return torch.load(Path(directory) / latest["dir"] / EXTRA_FILE, map_location="cpu", weights_only=False)


def load_sharded_checkpoint(directory: str | Path, model, optimizer) -> dict | None:
    """Load the newest checkpoint written by :func:`save_sharded_checkpoint` into ``model`` and
    ``optimizer`` (sharded or not, any number of processes) and return its ``extra``; None when
    there is none. Every process calls this."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text(encoding="utf-8"))
    folder = Path(directory) / latest["dir"]
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    # Not strict: the frozen weights are not in the checkpoint (they come from the base folder).
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    missing, unexpected = set_model_state_dict(model, state["model"], options=options)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if unexpected or set(missing) & trainable:
        raise RuntimeError(f"{folder}: the checkpoint does not fit this model (trained weights missing: "
                           f"{sorted(set(missing) & trainable)[:3]}, unexpected: {list(unexpected)[:3]})")
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    return read_sharded_progress(directory)
