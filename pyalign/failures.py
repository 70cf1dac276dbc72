"""What a failure looks like to the user: one line naming the file and what to do.

- :class:`DamagedFileError`: a file an earlier run wrote fails its check (:mod:`pyalign.io`);
- :func:`writing` / :func:`as_os_error`: a write that fails for lack of space or permission is an
  ``OSError`` naming the file, whatever library was writing (torch, safetensors, distributed
  checkpoints each report it their own way);
- :func:`describe_error`: an ``OSError`` as ``<file>: <what happened and what to do>``, the line
  ``pyalign`` prints (docs/training.md, "Failure modes").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path


class DamagedFileError(ValueError):
    """A file an earlier run wrote no longer holds what was written (changed bytes, cut short,
    not UTF-8 or not JSON). The message names the file, what is wrong and what to do."""


_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")


def as_os_error(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """``error`` raised while writing ``path`` as the ``OSError`` it stands for (naming ``path``
    when it names no file), or None when it is not an I/O failure. Libraries that write through
    their own code lose the errno: safetensors keeps it in its text ("os error 28"); torch's
    C++ writer (``[enforce fail at inline_container.cc]``) and distributed checkpoints keep none,
    so a nearly full file system is taken as the cause there."""
    if isinstance(error, OSError):
        partial = f"{path}.partial"  # pyalign.io's temporary name: the user knows the target
        if error.filename is None:
            error.filename = str(path)
        elif isinstance(error.filename, str) and error.filename.startswith(partial):
            error.filename = str(path) + error.filename[len(partial):]
        return error
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                found = as_os_error(inner, path)
                if found is not None:
                    return found
    text = str(error)
    number = _OS_ERROR_NUMBER.search(text)
    if number:
        code = int(number.group(1))
        return OSError(code, os.strerror(code), str(path))
    if "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text:
        code = errno.ENOSPC if _nearly_full(path) else errno.EIO
        return OSError(code, os.strerror(code), str(path))
    return None


def _nearly_full(path: str | os.PathLike) -> bool:
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Whatever is written inside fails, if it fails for lack of space or permission, as an
    ``OSError`` naming ``path``."""
    try:
        yield
    except Exception as error:
        converted = as_os_error(error, path)
        if converted is None or converted is error:
            raise
        raise converted from error


_REMEDIES = {
    errno.ENOSPC: "no space left on the device: free some (or point output_dir elsewhere) and rerun the same "
                  "command; it resumes from the last complete checkpoint",
    errno.EDQUOT: "disk quota exceeded: free some space and rerun the same command; it resumes from the last "
                  "complete checkpoint",
    errno.EFBIG: "file too large for this file system or the process's file-size limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system: write the outputs elsewhere (--output-dir)",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "exists and is not a folder",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.EIO: "input/output error (a failing disk or network file system)",
}


def describe_error(error: OSError) -> str:
    """One line for an ``OSError``: ``<file>: <what happened>``."""
    if error.errno is None:  # raised by pyalign with its own message (e.g. "<file>: data file not found")
        return str(error)
    what = _REMEDIES.get(error.errno) or error.strerror or str(error)
    where = error.filename
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    return f"{where}: {what}" if where is not None else what


def exit_report(error: BaseException) -> tuple[int, str] | None:
    """``(exit status, one-line message)`` for what a command reports rather than shows as a
    traceback: bad values, bad or damaged files and I/O failures (2), refusals by state (1), a
    stop on a signal (its own status: ``error.exit_status``); None for anything else (a bug)."""
    status = getattr(error, "exit_status", None)
    if isinstance(status, int):
        return status, str(error)
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted (a second Ctrl-C): the last complete checkpoint stands; run the same command again to resume"
    if isinstance(error, OSError):
        return 2, describe_error(error)
    if isinstance(error, ValueError):
        return 2, str(error)
    if isinstance(error, RuntimeError):
        return 1, str(error)
    return None
