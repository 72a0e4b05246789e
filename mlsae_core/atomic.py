"""Crash-safe writes: a killed process leaves the old complete file or the new one, never half.

Everything the project persists (checkpoints, Parquet tables, figures, DuckDB files) goes
through these helpers: write to a temporary sibling, fsync, then `os.replace` into place.

Atomic writes do not protect a file after it is written (a disk error, a stray `dd`, a
truncating copy), so what is read back is checked against a sha256 recorded at write time:
`sha256_file` for files whose manifest or sidecar records it, and Parquet tables carry theirs
inside the file (`write_parquet` / `read_parquet`; tables are derived data, so one without a
checksum is refused too and gets rebuilt). A mismatch raises `CorruptFileError`, which names
the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The key of the whole-file sha256 in a Parquet footer's key-value metadata (see write_parquet).
PARQUET_CHECKSUM_KEY = "mlsae.sha256"
_PLACEHOLDER = b"0" * 64  # as long as a sha256 hex digest
_HASH_CHUNK = 4 << 20


class CorruptFileError(ValueError):
    """A file does not match its recorded checksum or cannot be parsed: truncated or modified
    after it was written. The message names the file; `path` is it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed (hashlib releases the GIL: threads hash in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    The caller writes the temporary file however it likes (pyarrow, matplotlib, safetensors).
    On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes | bytearray) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (old copy removed after).

    Used for model directories (config + weights) that must appear as a whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
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


def write_parquet(path: str | os.PathLike[str], table: Any) -> None:
    """Write a `pyarrow.Table` atomically, with a sha256 of the whole file in its footer.

    Page checksums (CRC32) only cover data pages; on a small table most bytes are the footer
    (schema, statistics), so the file carries a sha256 of all its bytes: written as a
    placeholder in the footer's key-value metadata, then replaced by the digest of the file
    with the placeholder in place. `read_parquet` undoes the replacement to check it. The
    key is not part of the Arrow schema, so readers (pyarrow, DuckDB) never see it.
    Explicit schemas are the caller's job.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, write_page_checksum=True) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({PARQUET_CHECKSUM_KEY: _PLACEHOLDER.decode()})
    data = bytearray(sink.getvalue().to_pybytes())
    at = _footer_find(data, _PLACEHOLDER)
    if at < 0:
        raise RuntimeError(f"the Parquet writer dropped {PARQUET_CHECKSUM_KEY}; cannot checksum")
    data[at : at + len(_PLACEHOLDER)] = hashlib.sha256(data).hexdigest().encode()
    write_bytes(path, data)


def _footer_find(data: bytes | bytearray, value: bytes) -> int:
    """Offset of the last `value` inside a Parquet file's footer (-1: not there)."""
    footer = int.from_bytes(data[-8:-4], "little")
    return data.rfind(value, max(4, len(data) - 8 - footer), len(data) - 8)


def _verified_parquet_bytes(path: Path) -> bytes:
    """The file's bytes, once they match the checksum in its footer.

    A file without one is refused too: it was written before checksums or by another writer,
    or the corruption hit the checksum's own key, and the tables read this way are derived
    data that can be rebuilt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(path, f"cannot read {path}: {exc}") from exc
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        raise CorruptFileError(path, f"{path} is not a whole Parquet file (truncated?)")
    try:
        kv = pq.read_metadata(pa.BufferReader(data)).metadata or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure of the footer means the same
        raise CorruptFileError(
            path, f"{path} has an unreadable Parquet footer ({_line(exc)})"
        ) from exc
    recorded = kv.get(PARQUET_CHECKSUM_KEY.encode())
    if recorded is None:
        raise CorruptFileError(
            path,
            f"{path} has no {PARQUET_CHECKSUM_KEY} in its footer (written before checksums, "
            "by another writer, or modified)",
        )
    at = _footer_find(data, recorded)
    check = bytearray(data)
    if len(recorded) == len(_PLACEHOLDER) and at >= 0:
        check[at : at + len(recorded)] = _PLACEHOLDER
    if hashlib.sha256(check).hexdigest().encode() != recorded:
        raise CorruptFileError(
            path,
            f"{path} does not match the sha256 in its footer (truncated or modified after it "
            "was written)",
        )
    return data


def verify_parquet(path: str | os.PathLike[str]) -> None:
    """Raise CorruptFileError unless `path` matches its checksum (one read, no decoding)."""
    _verified_parquet_bytes(Path(path))


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> Any:
    """`pyarrow.parquet.read_table` of a file checked against its checksum first; a corrupt
    or truncated file raises CorruptFileError naming it."""
    path = Path(path)
    return _decode(path, _verified_parquet_bytes(path), columns)


def _line(exc: BaseException) -> str:
    """pyarrow's message on one line (they can end in newlines)."""
    return " ".join(str(exc).split())


def _decode(path: Path, data: bytes, columns: list[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(
            pa.BufferReader(data), columns=columns, page_checksum_verification=True
        )
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...
        raise CorruptFileError(path, f"{path} cannot be decoded ({_line(exc)})") from exc


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
