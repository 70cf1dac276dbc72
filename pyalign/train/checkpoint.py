"""Atomic, checked training checkpoints of one round.

Layout under ``<round_dir>/checkpoints``::

    step_000040/state.pt          trainable weights, optimizer, scheduler, objective state, progress
    step_000040/checksums.json    sha256 and size of every file of the checkpoint (written last)
    latest.json                   {"step": 40, "dir": "step_000040", "format": "torch"}

A checkpoint is written into ``.partial_step_000040``, its files fsynced and listed with their
sha256 in ``checksums.json``, renamed to ``step_000040`` (a new name, so the rename is atomic),
and only then is ``latest.json`` replaced (atomic too). A run killed at any moment therefore
leaves ``latest.json`` pointing at a complete checkpoint or at none.

Before a checkpoint is used its files are checked against ``checksums.json``, and it is loaded;
one that fails (changed bytes, cut short, empty, unreadable) is skipped with a warning naming the
file and the previous complete one is used (``training.keep_checkpoints`` >= 2 keeps one); when
none is left, :class:`~pyalign.failures.DamagedFileError` names the file and what to do. A damaged
or missing ``latest.json`` falls back to the newest checkpoint folder that checks out.
Checkpoints of versions without ``checksums.json`` are loaded unchecked.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pyalign import distributed
from pyalign.failures import DamagedFileError, writing
from pyalign.io import fsync_folder, has_manifest, read_json, verify_manifest, write_json_atomic, write_manifest

logger = logging.getLogger("pyalign.train")
STATE_FILE = "state.pt"
EXTRA_FILE = "extra.pt"


def _name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(directory: str | Path, step: int, state: dict, *, keep: int = 1) -> Path:
    """Write ``state`` (anything ``torch.save`` takes) as the checkpoint of ``step``; keep the
    ``keep`` newest checkpoints."""
    directory = Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".partial_*"):  # from runs killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
        partial = directory / f".partial_{_name(step)}"
        partial.mkdir()
    try:
        with writing(partial / STATE_FILE), (partial / STATE_FILE).open("wb") as handle:
            torch.save(state, handle)  # a Python file object: a failed write keeps its errno
        return _publish(directory, partial, step, "torch", keep)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        raise


def _publish(directory: Path, partial: Path, step: int, kind: str, keep: int) -> Path:
    """The complete checkpoint in ``partial`` becomes the newest: its files fsynced and listed in
    ``checksums.json``, renamed to its final name (new, so the rename is atomic), then
    ``latest.json`` replaced, then older ones pruned to ``keep`` (and any of later steps, left by a
    run that fell back past them, removed)."""
    name = _name(step)
    final = directory / name
    with writing(partial):
        write_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a run killed after this very rename
        os.replace(partial, final)
        fsync_folder(directory)
    write_json_atomic(directory / "latest.json", {"step": step, "dir": name, "format": kind})
    others = sorted(p for p in directory.glob("step_*") if p.is_dir() and p.name != name)
    older = [p for p in others if p.name < name]
    for stale in older[: max(0, len(older) - (keep - 1))] + [p for p in others if p.name > name]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- finding a usable checkpoint

@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int
    format: str  # "torch" (one state.pt) or "dcp" (torch.distributed.checkpoint shards + extra.pt)


def _remedy(directory: Path) -> str:
    return (f"no earlier complete checkpoint is kept (training.keep_checkpoints: 2 keeps one); delete "
            f"{directory} to start this stage from its beginning, or restore the file from a copy")


def _read_pointer(pointer: Path) -> dict:
    """``latest.json``, checked for consistency (its step and folder name agree, a known format):
    a changed byte that still parses as JSON is caught too."""
    latest = read_json(pointer, remedy="the newest complete checkpoint folder is used instead")
    if not (isinstance(latest, dict) and isinstance(latest.get("step"), int)
            and latest.get("dir") == _name(latest["step"]) and latest.get("format", "torch") in ("torch", "dcp")):
        raise DamagedFileError(f"{pointer}: damaged: not a checkpoint pointer ({str(latest)[:100]})")
    return latest


def _candidates(directory: Path) -> list[Checkpoint]:
    """The checkpoint ``latest.json`` names, then every older one, newest first; without a usable
    ``latest.json`` every checkpoint folder, newest first."""
    folders = sorted((p for p in directory.glob("step_*") if p.is_dir()), reverse=True)
    pointer = directory / "latest.json"
    latest = None
    if pointer.is_file():
        try:
            latest = _read_pointer(pointer)
        except DamagedFileError as error:
            logger.warning("%s; looking for the newest complete checkpoint instead", error)
    if latest is not None:
        folders = [p for p in folders if p.name <= latest["dir"]]
    found = []
    for folder in folders:
        kind = latest.get("format", "torch") if latest is not None and folder.name == latest["dir"] else (
            "dcp" if (folder / EXTRA_FILE).is_file() else "torch")
        found.append(Checkpoint(folder, int(folder.name.removeprefix("step_")), kind))
    return found


def _check(checkpoint: Checkpoint, directory: Path) -> dict:
    """Verify the checkpoint's files and read its progress (state.pt whole, or a DCP's extra.pt);
    raises DamagedFileError naming the file."""
    if has_manifest(checkpoint.folder):  # checkpoints of earlier versions have none: loaded unchecked
        verify_manifest(checkpoint.folder, remedy=_remedy(directory))
    file = checkpoint.folder / (EXTRA_FILE if checkpoint.format == "dcp" else STATE_FILE)
    try:
        # weights_only=False: the file holds optimizer dicts and history written by this very
        # module into the run's own output directory (and its checksum was just verified).
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a cut or damaged file raises EOFError, RuntimeError, ...
        raise DamagedFileError(f"{file}: damaged: cannot be loaded ({type(error).__name__}: "
                               f"{str(error)[:200]}); {_remedy(directory)}") from None


def find_checkpoint(directory: str | Path) -> tuple[Checkpoint, dict] | None:
    """The newest checkpoint that checks out and its progress (see the module docstring), or None
    when there is none. Damaged ones are skipped with a warning; when every one is damaged the
    newest one's error is raised."""
    directory = Path(directory)
    first_error = None
    for candidate in _candidates(directory):
        try:
            progress = _check(candidate, directory)
        except DamagedFileError as error:
            logger.warning("%s: skipped (%s); trying the previous checkpoint", candidate.folder,
                           str(error).split("; ")[0])
            first_error = first_error or error
            continue
        if first_error is not None:
            logger.warning("%s: resuming from this earlier checkpoint (step %d)", candidate.folder, candidate.step)
        return candidate, progress
    if first_error is not None:
        raise first_error
    return None


def find_checkpoint_everywhere(directory: str | Path) -> tuple[Checkpoint, dict] | None:
    """:func:`find_checkpoint` run by process 0 alone (it reads every file) and its choice given to
    every process, so that all load the same one; a DamagedFileError stops every process."""
    found, error = None, None
    if distributed.is_main():
        try:
            found = find_checkpoint(directory)
        except DamagedFileError as damaged:
            error = str(damaged)
    choice = distributed.broadcast_object((None if found is None else found[0], error))
    if choice[1] is not None:
        raise DamagedFileError(choice[1])
    if choice[0] is None:
        return None
    if found is not None:
        return found
    checkpoint = choice[0]
    return checkpoint, torch.load(checkpoint.folder / (EXTRA_FILE if checkpoint.format == "dcp" else STATE_FILE),
                                  map_location="cpu", weights_only=False)


def latest_step(directory: str | Path) -> int | None:
    """The step ``latest.json`` points at, or None (no checkpoint, or a damaged pointer)."""
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        return _read_pointer(pointer)["step"]
    except DamagedFileError:
        return None


def load_latest_checkpoint(directory: str | Path) -> dict | None:
    """The state of the newest complete checkpoint that checks out (single-file format), or None."""
    found = find_checkpoint(directory)
    return None if found is None else found[1]


# ----------------------------------------------------------------------------- sharded (DCP)
# With ``training.sharding: fsdp`` the trained weights and the optimizer state are split over the
# processes, so a checkpoint is written by all of them with torch.distributed.checkpoint: each
# process writes its own shards into ``.partial_step_N`` (DCP's ``.metadata`` last, by process 0),
# process 0 adds ``extra.pt`` (step, scheduler, objective state, history) and ``checksums.json``
# (every shard's sha256, read back from the shared file system), renames the folder to ``step_N``
# and only then replaces ``latest.json``: a kill at any moment leaves the pointer on a complete
# checkpoint or on none, as in the single-file format above. DCP stores every tensor's global
# shape and each shard's offsets, so a checkpoint loads under another number of processes (or into
# an unsharded model in one process) and is resharded on load.


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    # Frozen weights (a LoRA's base model) are the base folder's, not the run's: not saved.
    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _on_every_process(action: Callable[[], None]) -> None:
    """Run ``action`` on every process and raise on all of them if it failed on any (a process
    that went on alone would wait forever in the next collective)."""
    error = None
    try:
        action()
    except Exception as failure:  # noqa: BLE001 - reported on every process below
        error = failure
    errors = distributed.gather_objects(None if error is None else str(error))
    if error is not None:
        raise error
    others = [e for e in errors if e is not None]
    if others:
        raise RuntimeError(f"another process failed while writing a checkpoint: {others[0]}")


def save_sharded_checkpoint(directory: str | Path, step: int, model, optimizer, extra: dict, *,
                            keep: int = 1) -> Path:
    """Every process calls this; see the section comment above for the layout and the guarantees."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    directory = Path(directory)
    partial, final = directory / f".partial_{_name(step)}", directory / _name(step)

    def prepare():
        if distributed.is_main():
            with writing(directory):
                directory.mkdir(parents=True, exist_ok=True)
                for leftover in directory.glob(".partial_*"):  # from runs killed while saving
                    shutil.rmtree(leftover, ignore_errors=True)
                partial.mkdir()

    def shards():
        with writing(partial):
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(partial))

    def publish():
        if distributed.is_main():
            try:
                with writing(partial / EXTRA_FILE), (partial / EXTRA_FILE).open("wb") as handle:
                    torch.save(extra, handle)
                _publish(directory, partial, step, "dcp", keep)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise

    _on_every_process(prepare)
    _on_every_process(shards)
    _on_every_process(publish)
    return final


def load_sharded_checkpoint(folder: str | Path, model, optimizer) -> None:
    """Load the checkpoint in ``folder`` written by :func:`save_sharded_checkpoint` into ``model``
    and ``optimizer`` (sharded or not, any number of processes). Every process calls this, with
    the folder :func:`find_checkpoint_everywhere` chose."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    folder = Path(folder)
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
