"""Crash-safe writes: a killed process leaves the old complete file or the new one, never half.

Everything the project persists (checkpoints, Parquet tables, figures, DuckDB files) goes
through these helpers: write to a temporary sibling, fsync, then `os.replace` into place.

Atomic writes do not protect a file after it is written (a disk error, a stray `dd`, a
truncating copy), so every artefact directory keeps one manifest of its files' sizes and
sha256s (`record`, written last) and what is read back goes through `verify` first. A
missing, unrecorded or mismatching file raises `CorruptFileError`, which names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """A file does not match its recorded checksum or cannot be parsed: truncated or modified
    after it was written. The message names the file; `path` is it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed (hashlib releases the GIL: threads hash in parallel)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`; created with O_EXCL / mkdir, which fail if taken."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, and setting it
    for a moment would let another thread create a file with the wrong mode)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the mode the umask gives a new
    file: writers such as safetensors create their files 0600, and colleagues read results."""
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    The caller writes the temporary file however it likes (pyarrow, matplotlib, safetensors).
    On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _share(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (old copy removed after).

    Used for model directories (config + weights) that must appear as a whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    tmp.mkdir(0o777)
    try:
        yield tmp
        _share(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----- the one integrity rule -----------------------------------------------------------------
# Every artefact directory (checkpoint, training state, token chunks, activation cache, lens,
# run tables) holds one manifest of its files' sizes and sha256s, written last; `verify` checks
# files against it on read. One rule, one function: nothing else in the project hashes files.
MANIFEST_NAME = "manifest.json"


@contextlib.contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of one manifest (two assets may write one run directory):
    an flock on the directory itself, so no lock file is left beside the artefacts."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """name -> {bytes, sha256} of the files recorded in `directory` ({} when none are)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(path, f"{path} is not a readable manifest ({exc})") from exc
    return files


def record(directory: str | os.PathLike[str], names: Any, forget: Any = ()) -> None:
    """Record the sizes and sha256s of the files `names` (just written into `directory`) in its
    manifest, and drop `forget`; the manifest is rewritten atomically, after the files."""
    directory = Path(directory)
    with _manifest_lock(directory):
        files = read_manifest(directory)
        for name in forget:
            files.pop(name, None)
        for name in names:
            path = directory / name
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        write_json(directory / MANIFEST_NAME, {"files": files})


def verify(directory: str | os.PathLike[str], names: Any = None) -> None:
    """Raise CorruptFileError, naming the file, unless each of `names` (default: every file the
    manifest records) is in `directory`'s manifest with the same size and sha256."""
    directory = Path(directory)
    files = read_manifest(directory)
    for name in files if names is None else names:
        path = directory / name
        want = files.get(name)
        if want is None:
            raise CorruptFileError(
                path,
                f"{path} is not recorded in {directory / MANIFEST_NAME} (written by another "
                "tool, or its write was interrupted): rebuild or re-download it",
            )
        if not path.is_file():
            raise CorruptFileError(path, f"{path} is missing (recorded in its manifest)")
        if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise CorruptFileError(
                path,
                f"{path} does not match the sha256 in its manifest (truncated or modified "
                "after it was written): rebuild or re-download it",
            )


def write_parquet(path: str | os.PathLike[str], table: Any) -> None:
    """Write a `pyarrow.Table` atomically (page checksums on) and record it in its directory's
    manifest. Explicit schemas are the caller's job."""
    import pyarrow.parquet as pq

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    record(path.parent, [path.name])


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> Any:
    """`pyarrow.parquet.read_table` of a file `verify` accepts; a missing, corrupt or
    unrecorded file raises CorruptFileError naming it.

    Read by path, not from an in-memory `BufferReader`: with pyarrow 26 and torch in one
    process, reading from a buffer makes the interpreter abort at exit now and then
    ("terminate called without an active exception", exit status 134)."""
    import pyarrow.parquet as pq

    path = Path(path)
    verify(path.parent, [path.name])
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...
        msg = " ".join(str(exc).split())
        raise CorruptFileError(path, f"{path} cannot be decoded ({msg})") from exc


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete `.NAME.*.tmp` leftovers of writers killed mid-write (SIGKILL skips cleanup).

    Call only where one writer owns the directory (e.g. a training run's output directory
    at start-up): a live writer's temporary would be removed too.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def recover_dir(path: str | os.PathLike[str]) -> bool:
    """If a kill fell between atomic_dir's two renames, put the previous copy back."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], path)
    return True
