"""Documents -> fixed-length token chunks (docs/method.md §2): documents concatenated, each
followed by EOS, cut into rows of `max_length`; BOS/EOS/PAD positions are excluded downstream
via `TokenChunks.mask()`. Saved chunks are recorded in the manifest and verified on load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mlsae_core import atomic
from mlsae_core.documents import DataError, Document

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
        special = torch.tensor(sorted(self.special_ids), dtype=self.tokens.dtype)
        return ~torch.isin(self.tokens, special)

    @property
    def n_tokens(self) -> int:
        """Number of non-special positions: what training and metrics actually see."""
        return int(self.mask().sum())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def save(self, path: Path) -> None:
        """safetensors + a `<path>.json` sidecar (document ids, genres, specials), in the manifest."""
        path = Path(path)
        with atomic.atomic_path(path) as tmp:
            save_file(
                {"tokens": self.tokens.contiguous(), "doc_index": self.doc_index.contiguous()},
                str(tmp),
            )
        atomic.write_json(
            _sidecar(path),
            {
                "format": "mlsae-token-chunks-v1",
                "shape": list(self.tokens.shape),
                "special_ids": sorted(self.special_ids),
                "ids": [d.id for d in self.documents],
                "genres": [d.genre for d in self.documents],
            },
        )
        atomic.record(path.parent, [path.name, _sidecar(path).name])

    @classmethod
    def load(cls, path: Path) -> TokenChunks:
        """Inverse of `save`, both files verified against the directory's manifest first;
        document texts come back empty."""
        path = Path(path)
        try:
            atomic.verify(path.parent, [path.name, _sidecar(path).name])
        except atomic.CorruptFileError as exc:
            raise DataError(f"{exc} (`mlsae sweep` re-runs the tokenization)") from exc
        try:
            meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
            tensors = load_file(str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
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


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """BOS/EOS/PAD ids that the tokenizer defines: the positions excluded from training."""
    ids = (getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return frozenset(int(i) for i in ids if i is not None)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without specials; literal "<|endoftext|>" in text stays text, not EOS."""
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pieces(
    docs: Iterable[Document],
    tokenizer: PreTrainedTokenizerBase,
    eos: int,
    max_tokens: int | None,
    batch_docs: int,
) -> tuple[list[torch.Tensor], list[Document]]:
    """Per-document token ids with EOS appended, tokenized `batch_docs` at a time, the stream
    cut at `max_tokens` (the document that reaches it is truncated, later ones not read)."""
    pieces: list[torch.Tensor] = []
    documents: list[Document] = []
    total = 0
    docs = iter(docs)
    with tqdm(total=max_tokens, desc="tokenizing", unit="tok", leave=False) as bar:
        while True:
            buffer = [doc for _, doc in zip(range(batch_docs), docs, strict=False)]
            if not buffer:
                return pieces, documents
            for doc, ids in zip(buffer, _encode(tokenizer, [d.text for d in buffer]), strict=True):
                piece = torch.tensor([*ids, eos], dtype=torch.int64)
                if max_tokens is not None:
                    piece = piece[: max_tokens - total]
                pieces.append(piece)
                documents.append(doc)
                total += len(piece)
                bar.update(len(piece))
                if max_tokens is not None and total >= max_tokens:
                    return pieces, documents


def tokenize_chunks(
    docs: Iterable[Document],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_tokens: int | None = None,
    batch_docs: int = 64,
) -> TokenChunks:
    """Tokenize documents into one EOS-separated stream and cut it into `max_length` rows.

    The stream is truncated at `max_tokens` (EOS included in the count); only the last row is
    padded (PAD, or EOS when the tokenizer has no PAD). Concatenating the rows and dropping the
    trailing padding gives exactly the stream: nothing lost, duplicated or reordered.
    """
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
    pieces, documents = _pieces(docs, tokenizer, int(eos), max_tokens, batch_docs)
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    if not torch.isin(stream, torch.tensor(sorted(specials))).logical_not().any():
        raise DataError(
            f"no tokens to train on ({len(documents)} documents, all empty): the source is empty; "
            "check the dataset path/id and text_field"
        )
    total = len(stream)
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(pieces), dtype=torch.int32), lengths)
    n_chunks = -(-total // max_length)
    tokens = F.pad(stream, (0, n_chunks * max_length - total), value=int(pad))
    doc_index = F.pad(owner, (0, n_chunks * max_length - total), value=-1)
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
