"""The one place for writing files that a killed run must never leave half-written, and for
reading back, checked, what an earlier run wrote.

Every writer here puts the bytes next to the target under a ``.partial`` name, fsyncs them,
renames into place (``os.replace`` is atomic on POSIX) and fsyncs the folder, so after a crash or
a power cut a reader sees the old file or the new one, never a mixture or nothing. A file whose
bytes would not change is not rewritten (a finished run can be rerun from read-only media). JSONL
outputs that grow row by row (generation, scoring, revision runs) use :class:`JsonlAppender`: each
row is one complete line, fsynced before the call returns, and :func:`read_jsonl_rows` drops a
torn last line left by a kill, so "resume after the last written row" is well defined.

Integrity (what a resume or a skip trusts is checked before use; docs/training.md, "Failure
modes"): a JSON state file can carry its own sha256 (``write_json_atomic(..., checksum=True)``,
verified by :func:`read_json`), a folder a manifest of its files' sha256
(:func:`write_manifest` / :func:`verify_manifest`), and appended JSONL rows one digest per row in
a ``<file>.sha256`` beside them. What fails a check raises :class:`DamagedFileError` naming the
file. A write that fails for lack of space or permission raises ``OSError`` naming the file,
whatever library was writing (:func:`pyalign.failures.writing`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pyalign.failures import DamagedFileError, writing

CHECKSUM_KEY = "pyalign_sha256"  # in a JSON object written with checksum=True
MANIFEST = "checksums.json"  # in a folder: {relative path: {"sha256", "bytes"}}


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# ----------------------------------------------------------------------------- atomic writers

def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (its entry, not only the file's bytes)."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform or file system without directory handles: nothing more can be done
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync folders
            raise
    finally:
        os.close(handle)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if _same_bytes(path, data):
        return path
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial(path)
        try:
            with partial.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)  # a disk-full write leaves no partial file behind
            raise
        os.replace(partial, path)
        fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, checksum: bool = False) -> Path:
    """JSON with sorted keys; objects JSON does not know (paths, ...) are written as ``str``.
    ``checksum``: a dict also gets the sha256 of its content, which :func:`read_json` checks."""
    if checksum:
        plain = json.loads(_canonical(data))
        data = {**plain, CHECKSUM_KEY: hashlib.sha256(_canonical(plain)).hexdigest()}
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, default=str))


def save_figure_atomic(figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG at ``path`` (rendered in memory, then written atomically);
    the figure is closed."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib only where a plot is drawn)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial(path)
        try:
            # through a Python file object: a failed write then raises OSError with its errno,
            # where torch's own writer reports only "[enforce fail at inline_container.cc]"
            with partial.open("wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
        fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, manifest: bool = False) -> Iterator[Path]:
    """Yield a fresh ``<path>.partial`` folder to fill; on success it replaces ``path`` (which
    therefore exists complete or not at all), its files fsynced first. A leftover partial folder
    from a killed run is removed first; on an exception the partial folder is removed and
    ``path`` is untouched. ``manifest``: write :data:`MANIFEST` into it (:func:`verify_manifest`)."""
    path = Path(path)
    partial = _partial(path)
    with writing(path):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    try:
        with writing(path):
            yield partial
            if manifest:
                write_manifest(partial)
            else:
                sync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    with writing(path):
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
        fsync_folder(path.parent)


def sync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            handle = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        fsync_folder(root)


# ----------------------------------------------------------------------------- checksums

def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (data fingerprint of the log-prob cache, manifests)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """fsync every file under ``folder`` and record its sha256 and size in ``folder/checksums.json``
    (written last: a folder with a manifest was complete when the manifest was written)."""
    folder = Path(folder)
    sync_tree(folder)
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[file.relative_to(folder).as_posix()] = {"sha256": file_fingerprint(file), "bytes": file.stat().st_size}
    return write_json_atomic(folder / MANIFEST, {"files": entries}, checksum=True)


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify_manifest(folder: str | os.PathLike, *, remedy: str) -> None:
    """Check every file ``folder/checksums.json`` lists (present, same size, same sha256);
    raise :class:`DamagedFileError` naming the first that differs, followed by ``remedy``."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, remedy=remedy)
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            problem = "missing"
        elif file.stat().st_size != expected["bytes"]:
            problem = f"{file.stat().st_size} bytes, {expected['bytes']} were written (cut short or grown)"
        elif file_fingerprint(file) != expected["sha256"]:
            problem = "its bytes changed since it was written (sha256 differs from checksums.json)"
        else:
            continue
        raise DamagedFileError(f"{file}: damaged: {problem}; {remedy}")


# ----------------------------------------------------------------------------- reading

def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; a file that is not UTF-8 is a ValueError naming the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {error.start}: 0x{data[error.start]:02x})") from None


def read_json(path: str | os.PathLike, *, remedy: str | None = None) -> Any:
    """A JSON file written by this module: one that is not UTF-8 or not JSON, or whose embedded
    checksum (``write_json_atomic(..., checksum=True)``) differs, is a :class:`DamagedFileError`
    naming the file (followed by ``remedy``, what to do about it). The checksum is not returned."""
    path = Path(path)
    remedy = remedy or "delete it to have it made again, or restore it from a copy"
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path}: damaged: not valid JSON ({error.msg} at line {error.lineno} column "
                               f"{error.colno}); {remedy}") from None
    except ValueError as error:  # not UTF-8
        raise DamagedFileError(f"{error}: damaged; {remedy}") from None
    if isinstance(data, dict) and CHECKSUM_KEY in data:
        stored = data.pop(CHECKSUM_KEY)
        if hashlib.sha256(_canonical(data)).hexdigest() != stored:
            raise DamagedFileError(f"{path}: damaged: its content differs from the checksum written with it; "
                                   f"{remedy}")
    return data


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """A whole JSONL file at once (one JSON value per line)."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(path, lines)


def _digests_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _row_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _verified_lines(path: Path) -> tuple[list[bytes], int | None]:
    """The complete lines of ``path`` and, when it has row digests (``<file>.sha256``), how many
    of them check out from the start (None: no digests). A row without its digest yet is what a
    kill between the two writes leaves: not a row."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is empty, or torn
    digests_file = _digests_file(path)
    if not digests_file.is_file():
        return lines, None
    digests = digests_file.read_bytes().split(b"\n")[:-1]
    good = 0
    for line, digest in zip(lines, digests):
        if _row_digest(line + b"\n").encode() != digest:
            break
        good += 1
    return lines, good


def read_jsonl_rows(path: str | os.PathLike) -> list[Any]:
    """The complete rows of a JSONL file written by :class:`JsonlAppender` (or any JSONL file).
    A last line without its newline is what a kill mid-write leaves: it is not a row. A broken
    line elsewhere is an error naming the file and line. With row digests, rows from the first
    one that does not match its digest on are left out (logged): they are written again."""
    path = Path(path)
    if not path.is_file():
        return []
    lines, good = _verified_lines(path)
    if good is not None and good < len(lines):
        _log_dropped(path, good, len(lines))
        lines = lines[:good]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 text (byte {error.start} of the line)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _truncate(file: Path, size: int) -> None:
    if file.stat().st_size != size:
        with file.open("r+b") as handle:
            handle.truncate(size)


def _log_dropped(path: Path, good: int, total: int) -> None:
    import logging  # noqa: PLC0415

    logging.getLogger("pyalign").warning(
        "%s: row %d of %d does not match its digest in %s (damaged, or cut by a kill): it and the rows "
        "after it are not used and are made again", path, good + 1, total, _digests_file(path).name)


class JsonlAppender:
    """Append rows to a JSONL file durably, resuming after the rows already there.

        with JsonlAppender(path) as out:
            for i, item in enumerate(items):
                if i < out.count:      # written by an earlier, killed run
                    continue
                out.write(make_row(item))

    On open, a torn last line (a kill mid-write) is cut off, so ``count`` is the number of
    complete rows and new rows follow them directly. ``checksums``: each row's sha256 goes to
    ``<file>.sha256`` too; on open, rows from the first that does not match on are cut off (and
    made again by the caller), so a damaged row is never trusted."""

    def __init__(self, path: str | os.PathLike, *, checksums: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digests = _digests_file(self.path)
        self.checksums = checksums or digests.is_file()
        if self.checksums and self.path.is_file() and not digests.is_file():
            # rows of a version that wrote no digests: taken as they are, checked from now on
            lines = self.path.read_bytes().split(b"\n")[:-1]
            atomic_write_text(digests, "".join(_row_digest(line + b"\n") + "\n" for line in lines))
        self.rows = read_jsonl_rows(self.path)
        self._truncate_to_rows()
        self._handle = None
        self._digests = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def _truncate_to_rows(self) -> None:
        """Cut a torn last line, and with digests every row from the first that does not match."""
        if not self.path.is_file():
            return
        lines, good = _verified_lines(self.path)
        keep = len(lines) if good is None else good
        _truncate(self.path, sum(len(line) + 1 for line in lines[:keep]))
        if good is not None:
            _truncate(_digests_file(self.path), keep * 65)  # 64 hex digits and a newline per row

    def __enter__(self) -> "JsonlAppender":
        new = not self.path.exists()
        self._handle = self.path.open("a", encoding="utf-8")
        if self.checksums:
            self._digests = _digests_file(self.path).open("a", encoding="ascii")
        if new:
            fsync_folder(self.path.parent)
        return self

    def write(self, record: Any) -> None:
        if self._handle is None:
            raise RuntimeError("JsonlAppender.write: use it as a context manager")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with writing(self.path):
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            if self._digests is not None:  # after the row: a row without a digest is not trusted
                self._digests.write(_row_digest(line.encode("utf-8")) + "\n")
                self._digests.flush()
                os.fsync(self._digests.fileno())
        self.rows.append(record)

    def __exit__(self, *exc) -> None:
        for handle in (self._handle, self._digests):
            if handle is not None:
                handle.close()
        self._handle = self._digests = None
