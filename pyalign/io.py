"""The one place for writing files that a killed run must never leave half-written.

Every writer here puts the bytes next to the target under a ``.partial`` name, flushes them to
disk and renames into place (``os.replace`` is atomic on POSIX), so a reader sees the old file or
the new one, never a mixture. JSONL outputs that grow row by row (generation, scoring, revision
runs) use :class:`JsonlAppender`: each row is one complete line, flushed and fsynced before the
call returns, and :func:`read_jsonl_rows` drops a torn last line left by a kill, so "resume after
the last written row" is well defined.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """JSON with sorted keys; objects JSON does not know (paths, ...) are written as ``str``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, default=str))


def save_figure_atomic(figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG at ``path`` (rendered in memory, then written atomically);
    the figure is closed."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib only where a plot is drawn)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    with partial.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh ``<path>.partial`` folder to fill; on success it replaces ``path`` (which
    therefore exists complete or not at all). A leftover partial folder from a killed run is
    removed first; on an exception the partial folder is removed and ``path`` is untouched."""
    path = Path(path)
    partial = _partial(path)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """A whole JSONL file at once (one JSON value per line)."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(path, lines)


def read_jsonl_rows(path: str | os.PathLike) -> list[Any]:
    """The complete rows of a JSONL file written by :class:`JsonlAppender` (or any JSONL file).
    A last line without its newline is what a kill mid-write leaves: it is not a row. A broken
    line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty, or torn
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


class JsonlAppender:
    """Append rows to a JSONL file durably, resuming after the rows already there.

        with JsonlAppender(path) as out:
            for i, item in enumerate(items):
                if i < out.count:      # written by an earlier, killed run
                    continue
                out.write(make_row(item))

    On open, a torn last line (a kill mid-write) is cut off, so ``count`` is the number of
    complete rows and new rows follow them directly."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_jsonl_rows(self.path)
        self._truncate_torn_tail()
        self._handle = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def _truncate_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # 0 when there is no complete line
        if end != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(end)

    def __enter__(self) -> "JsonlAppender":
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def write(self, record: Any) -> None:
        if self._handle is None:
            raise RuntimeError("JsonlAppender.write: use it as a context manager")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.rows.append(record)

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (data fingerprint of the log-prob cache)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
