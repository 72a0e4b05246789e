"""One writer per output directory: a lock file that names its owner.

The lock is an OS file lock (`flock`) on `<dir>/.mlsae.lock`, so it is released when its
process dies however it dies: a lock left by a killed run is stale by construction and the
next run takes it. The file also records the owner's pid, host, start time and command, so a
second writer is refused with a message that names the other process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".mlsae.lock"


class OutputLocked(RuntimeError):
    """Another process is writing the same output directory."""


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {started}: "
        f"{info.get('command', '?')})"
    )


def _acquire(directory: Path) -> int:
    """An open descriptor holding the lock file's flock; OutputLocked if another holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLocked(
            f"{directory} is being written by {_owner(path)}; wait for it to finish or "
            "stop it, or pick another --out directory"
        ) from None
    return fd


def refuse_if_locked(directory: str | os.PathLike[str]) -> None:
    """Raise OutputLocked now if another process holds `directory`'s lock: a check before
    minutes of loading, so a second writer is refused at once. It holds nothing;
    `output_lock` (taken by `train.train`) is what keeps the directory."""
    os.close(_acquire(Path(directory)))


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of `directory` for the body; refuse at once if someone else holds it.

    Not re-entrant: taken once per run, by `train.train`; a second hold of the same directory,
    even in this process, is refused like any other writer."""
    directory = Path(directory)
    fd = _acquire(directory)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield directory / LOCK_NAME
    finally:
        os.close(fd)  # releases the flock
