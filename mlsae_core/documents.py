"""Text sources as documents (local files .txt, .jsonl, .jsonl.zst, .parquet; the dataset hub),
each with a stable id so the train/test split by document and the examples can name it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from mlsae_core.config import DataConfig


class DataError(ValueError):
    """A text source is missing, empty or unreadable; the message names the source and the fix."""


@dataclass(frozen=True)
class Document:
    """One document of a source; `id` is stable so splits and examples can refer to it."""

    id: str
    text: str
    genre: str = ""


_LOCAL_FORMATS = ".txt, .jsonl, .jsonl.zst, .parquet (or a directory of them)"


def _jsonl_documents(
    lines: Iterable[str], rel: str, file: Path, text_field: str
) -> Iterator[Document]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{file}: line {number} is not valid JSON ({e}); expected one JSON object per line"
            ) from e
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(
                f"{file}: line {number} has no field {text_field!r}; pass the right text_field"
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{file}: line {number} field {text_field!r} is {type(text).__name__}, not text"
            )
        yield Document(id=f"{rel}:{number}", text=text)


def _file_documents(file: Path, rel: str, text_field: str) -> Iterator[Document]:
    name = file.name.lower()
    try:
        if name.endswith(".txt"):
            yield Document(id=rel, text=file.read_text(encoding="utf-8"))
        elif name.endswith((".jsonl", ".jsonl.zst")):
            opener = zstandard.open if name.endswith(".zst") else open
            with opener(file, "rt", encoding="utf-8") as f:
                yield from _jsonl_documents(f, rel, file, text_field)
        elif name.endswith(".parquet"):
            yield from _parquet_documents(file, rel, text_field)
        else:
            raise DataError(f"{file}: unsupported file type; allowed: {_LOCAL_FORMATS}")
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:  # incl. pyarrow's ArrowInvalid
        raise DataError(f"{file}: cannot read it ({e}); allowed: {_LOCAL_FORMATS}, UTF-8") from e
    except Exception as e:  # zstandard.ZstdError and other decoder errors
        if type(e).__module__.split(".")[0] in {"zstandard", "pyarrow"}:
            raise DataError(f"{file}: cannot decode it ({e}); allowed: {_LOCAL_FORMATS}") from e
        raise


def _parquet_documents(file: Path, rel: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # heavy, and only .parquet sources need it

    pf = pq.ParquetFile(file)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{file}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
            "pass the right text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                if not isinstance(text, str):
                    raise DataError(
                        f"{file}: column {text_field!r} holds {type(text).__name__}, not text"
                    )
                yield Document(id=f"{rel}:{row}", text=text)
            row += 1


def local_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents from a local file or a directory of files (recursive, sorted, hidden skipped),
    with ids: the relative path plus the line (1-based, .jsonl) or row (0-based, .parquet)."""
    path = Path(path)
    if path.is_file():
        yield from _file_documents(path, path.name, text_field)
        return
    if not path.is_dir():
        raise DataError(f"{path} does not exist; give a file or directory of {_LOCAL_FORMATS}")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} holds no files; expected {_LOCAL_FORMATS}")
    for f in files:
        yield from _file_documents(f, f.relative_to(path).as_posix(), text_field)


def hub_documents(
    dataset_id: str, split: str = "train", text_field: str = "text"
) -> Iterator[Document]:
    """Stream a dataset from the HuggingFace hub (the online default, e.g. the Pile)."""
    fix = "the dataset hub may be unreachable: use a local file/directory or 'brown' instead"
    try:
        import datasets  # heavy, and only hub sources need it

        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        for index, row in enumerate(stream):
            if text_field not in row:
                raise DataError(
                    f"{dataset_id}: rows have no field {text_field!r} (fields: {sorted(row)})"
                )
            yield Document(id=f"{dataset_id}:{index}", text=row[text_field] or "")
    except DataError:
        raise
    except Exception as e:  # network, auth, missing dataset: all mean "cannot use the hub"
        raise DataError(
            f"cannot load {dataset_id!r} (split {split!r}) from the hub: {e}; {fix}"
        ) from e


def load_documents(
    dataset: str, text_field: str = "text", split: str = "train"
) -> Iterator[Document]:
    """Pick the source: an existing local path, or else a hub dataset id."""
    if Path(dataset).expanduser().exists():
        return local_documents(Path(dataset).expanduser(), text_field=text_field)
    return hub_documents(dataset, split=split, text_field=text_field)


# ----- train/test split --------------------------------------------------------------------


def _unit_hash(seed: int, doc_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_test_document(doc: Document, test_fraction: float, seed: int = 0) -> bool:
    """The split rule on its own, for streamed sources that cannot be listed up front."""
    return _unit_hash(seed, doc.id) < test_fraction


def split_documents(
    docs: Iterable[Document], test_fraction: float = DataConfig.test_fraction, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split by document (order kept): test iff blake2b(f"{seed}:{id}") maps below
    `test_fraction`, so a side depends only on the id; but when 0 < fraction < 1 would leave a
    side of two or more documents empty, the one closest to the threshold moves across."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    docs = list(docs)
    hashes = [_unit_hash(seed, d.id) for d in docs]
    is_test = [h < test_fraction for h in hashes]
    if len(docs) >= 2 and 0.0 < test_fraction < 1.0:
        if not any(is_test):
            is_test[min(range(len(docs)), key=hashes.__getitem__)] = True
        elif all(is_test):
            is_test[max(range(len(docs)), key=hashes.__getitem__)] = False
    train = [d for d, t in zip(docs, is_test, strict=True) if not t]
    test = [d for d, t in zip(docs, is_test, strict=True) if t]
    return train, test
