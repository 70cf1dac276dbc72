"""One writer per output: an advisory lock held for a whole run.

``with exclusive(folder):`` takes ``fcntl.flock`` on ``folder/.pyalign.lock`` (created if need be)
and writes the holder (pid, host, command, start time) into it. A second process gets
:class:`OutputInUseError`, naming that holder. The kernel drops the lock when its process ends,
however it ends (a kill -9 too), so a lock file left by a dead process never blocks: the next
run takes it and writes itself in. ``flock`` works across the hosts of NFS v4 and Lustre mounts
(where locking is enabled); on a file system without locking, or one mounted read-only (where a
finished run is only read), the run goes on without a lock, with a warning in the first case.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".pyalign.lock"
logger = logging.getLogger("pyalign")


class OutputInUseError(ValueError):
    """Another live process holds the output's lock; the message names it."""


def _holder(handle: int) -> dict:
    try:
        raw = os.pread(handle, 4096, 0)
        return json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, *, what: str) -> Iterator[None]:
    """Hold the lock ``lock_file`` until the block ends; ``what`` names the guarded output in the
    message a second process gets (e.g. ``output_dir /runs/a``)."""
    lock_file = Path(lock_file)
    try:
        handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield  # nobody can write here through this mount: a finished run can still be read
            return
        raise
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            since = holder.get("started")
            raise OutputInUseError(
                f"{what}: in use by another pyalign process (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}"
                + (f", running `{holder['command']}`" if holder.get("command") else "")
                + (f", since {since}" if since else "")
                + f"); wait for it to end, or use another output folder (lock: {lock_file})") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: this file system does not support locking; nothing stops two runs from "
                           "writing %s at once", lock_file, what)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(me) + "\n").encode("utf-8"), 0)
        yield
    finally:
        os.close(handle)  # releases the flock
