"""End-to-end runs: model + corpus + MLSAE config -> a trained checkpoint, or a test table.

The CLI and the Dagster pipeline both call these, so a run means the same thing everywhere.
A checkpoint's config.json records where its data came from, so `test` finds the held-out
split of the same corpus without being told.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsae_core.config import ConfigError, DataConfig, SAEConfig, TrainConfig

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
BROWN = "brown"


def model_slug(name: str) -> str:
    """A file-name-safe short name: 'EleutherAI/pythia-70m-deduped' -> 'pythia-70m-deduped'."""
    base = name.rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "model"


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """None -> all layers; otherwise validated, sorted, de-duplicated."""
    if layers is None or len(layers) == 0:
        return list(range(n_layers))
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(
            f"layers={bad} is not allowed: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return out


def layers_label(layers: Sequence[int]) -> str:
    """'0-29' for a contiguous range, '3' for one layer, '0,5,10' otherwise."""
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError("layers must not be empty")
    if len(layers) == 1:
        return str(layers[0])
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


@dataclass(frozen=True)
class RunSpec:
    """One MLSAE to train: which model, which layers, which SAE, data and optimiser settings."""

    model_name: str = SMOLLM2
    layers: tuple[int, ...] | None = None
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset=BROWN))
    train: TrainConfig = field(default_factory=TrainConfig)

    def slug(self, n_layers: int) -> str:
        label = layers_label(resolve_layers(self.layers, n_layers)).replace(",", "_")
        return f"{model_slug(self.model_name)}-x{self.sae.expansion_factor}-k{self.sae.k}-L{label}"


def _documents(data: DataConfig, seed: int) -> tuple[Iterable[Any], Iterable[Any]]:
    """(train docs, test docs) split by document; local sources are shuffled with `seed`."""
    from mlsae_core import data as d

    docs = d.load_documents(data.dataset, text_field=data.text_field, split=data.split)
    if data.dataset == BROWN or Path(data.dataset).exists():
        train, test = d.split_documents(docs, data.test_fraction, seed)
        rng = random.Random(seed)
        rng.shuffle(train)
        rng.shuffle(test)
        return train, test

    def side(want_test: bool):
        for doc in docs:
            if d.is_test_document(doc, data.test_fraction, seed) == want_test:
                yield doc

    return side(False), side(True)


def corpus_split(
    transformer: Any, data: DataConfig, seed: int, which: str, max_tokens: int | None
) -> Any:
    """Token chunks of one side ('train' or 'test') of the document split."""
    from mlsae_core.data import DataError, tokenize_chunks

    if data.max_length > transformer.max_context:
        raise ConfigError(
            f"max_length={data.max_length} is not allowed: {transformer.name} has a context "
            f"of {transformer.max_context} tokens"
        )
    train, test = _documents(data, seed)
    docs = train if which == "train" else test
    chunks = tokenize_chunks(docs, transformer.tokenizer, data.max_length, max_tokens=max_tokens)
    if chunks.n_tokens == 0:
        raise DataError(f"the {which} split of {data.dataset!r} has no usable tokens")
    return chunks


def checkpoint_metadata(spec: RunSpec, layers: list[int], n_layers: int) -> dict[str, Any]:
    return {
        "model_name": spec.model_name,
        "layers": layers,
        "n_model_layers": n_layers,
        "expansion_factor": spec.sae.expansion_factor,
        "dataset": spec.data.dataset,
        "text_field": spec.data.text_field,
        "max_length": spec.data.max_length,
        "max_tokens": spec.data.max_tokens,
        "test_fraction": spec.data.test_fraction,
        "split_seed": spec.train.seed,
        "auxk_coef": spec.sae.auxk_coef,
    }


def train_run(
    spec: RunSpec,
    out_dir: str | Path,
    transformer: Any = None,
    source: Any = None,
    train_chunks: Any = None,
    progress: bool = True,
    on_step: Any = None,
) -> Any:
    """Train (or resume) the MLSAE described by `spec` into `out_dir`; returns the MLSAE.

    `source` may be an activation cache (mlsae_core.cache) shared by a sweep's configs;
    by default activations are computed live by the transformer.
    """
    from mlsae_core.config import resolve_device
    from mlsae_core.train import LiveActivations, train
    from mlsae_core.transformer import Transformer

    device = resolve_device(spec.train.device)  # before loading anything
    if transformer is None:
        transformer = Transformer.load(spec.model_name, device=device)
    # Everything checkable once the model is known, before tokenizing or training:
    layers = resolve_layers(spec.layers, transformer.n_layers)
    spec.sae.n_latents(transformer.d_model)
    if spec.data.max_length > transformer.max_context:
        raise ConfigError(
            f"max_length={spec.data.max_length} is not allowed: {transformer.name} has a "
            f"context of {transformer.max_context} tokens"
        )
    if train_chunks is None:
        train_chunks = corpus_split(
            transformer, spec.data, spec.train.seed, "train", spec.data.max_tokens
        )
    if source is None:
        source = LiveActivations(transformer, train_chunks.tokens, layers)
    meta = checkpoint_metadata(spec, layers, transformer.n_layers)
    return train(
        source,
        train_chunks.mask(),
        spec.sae,
        spec.train,
        out_dir,
        batch_size=spec.data.batch_size,
        max_tokens=spec.data.max_tokens,
        metadata=meta,
        progress=progress,
        on_step=on_step,
    )


@dataclass
class TestSetup:
    """A checkpoint ready to evaluate: the SAE, its transformer, layers and held-out chunks."""

    sae: Any
    transformer: Any
    layers: list[int]
    chunks: Any  # TokenChunks of the test split


def load_for_test(
    repo_id: str | Path,
    dataset: str | None = None,
    max_tokens: int = 100_000,
    max_length: int | None = None,
    device: str = "cpu",
    transformer: Any = None,
) -> TestSetup:
    """Load a checkpoint, its transformer and the held-out split recorded in its config."""
    from mlsae_core.sae import MLSAE
    from mlsae_core.transformer import Transformer

    sae = MLSAE.from_pretrained(repo_id, device=device)
    meta = sae.metadata
    model_name = meta.get("model_name")
    if transformer is None:
        if not model_name:
            raise ConfigError(
                f"{repo_id}: config.json does not say which model it was trained on "
                "(model_name); it was not written by mlsae train"
            )
        transformer = Transformer.load(model_name, device=device)
    if transformer.d_model != sae.n_inputs:
        raise ConfigError(
            f"the MLSAE expects d={sae.n_inputs} inputs but {transformer.name} has "
            f"d_model={transformer.d_model}"
        )
    layers = resolve_layers(meta.get("layers"), transformer.n_layers)
    data = DataConfig(
        dataset=dataset or meta.get("dataset", BROWN),
        max_length=max_length or int(meta.get("max_length", 256)),
        max_tokens=max_tokens,
        test_fraction=float(meta.get("test_fraction", 0.1)),
        text_field=meta.get("text_field", "text"),
    )
    chunks = corpus_split(transformer, data, int(meta.get("split_seed", 0)), "test", max_tokens)
    return TestSetup(sae, transformer, layers, chunks)


def test_run(
    repo_id: str | Path,
    dataset: str | None = None,
    max_tokens: int = 100_000,
    max_length: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    transformer: Any = None,
    splice_max_tokens: int | None = None,
    progress: bool = True,
    delta_dtype: str = "auto",
) -> tuple[list[dict[str, Any]], Any]:
    """Evaluate a checkpoint on its held-out split; returns (metric rows, sae).

    delta_dtype: precision of the splice metrics' logit GEMM (evaluate.resolve_delta_dtype).
    """
    from mlsae_core.evaluate import evaluate

    setup = load_for_test(repo_id, dataset, max_tokens, max_length, device, transformer)
    result = evaluate(
        setup.transformer,
        setup.sae,
        setup.chunks.tokens,
        setup.chunks.mask(),
        setup.layers,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        splice_max_tokens=splice_max_tokens,
        delta_dtype=delta_dtype,
    )
    return result.rows, setup.sae


def partition_values(sae: Any) -> dict[str, Any]:
    """The columns that identify a config in every table: model, expansion_factor, k, layers."""
    meta = sae.metadata
    layers = meta.get("layers") or list(range(meta.get("n_model_layers", 1)))
    return {
        "model": model_slug(str(meta.get("model_name", "unknown"))),
        "expansion_factor": int(meta.get("expansion_factor", sae.n_latents // sae.n_inputs)),
        "k": int(sae.k),
        "layers": layers_label(layers),
    }


def metrics_table(rows: list[dict[str, Any]], partition: dict[str, Any]) -> Any:
    """The test metrics as a pyarrow Table with an explicit schema."""
    import pyarrow as pa

    from mlsae_core.analysis.tables import PARTITION_FIELDS
    from mlsae_core.metrics import METRIC_COLUMNS

    schema = pa.schema(
        [
            *PARTITION_FIELDS,
            ("layer", pa.string()),
            *[(c, pa.float64()) for c in METRIC_COLUMNS],
        ]
    )
    return pa.Table.from_pylist([{**partition, **r} for r in rows], schema=schema)


def write_metrics(rows: list[dict[str, Any]], partition: dict[str, Any], out_csv: str | Path):
    """Write the tidy metrics table as CSV and as Parquet beside it (both atomic)."""
    import pyarrow.csv as pacsv

    from mlsae_core import atomic

    out_csv = Path(out_csv)
    table = metrics_table(rows, partition)
    with atomic.atomic_path(out_csv) as tmp:
        pacsv.write_csv(table, tmp)
    atomic.write_parquet(out_csv.with_suffix(".parquet"), table)
    return out_csv, out_csv.with_suffix(".parquet")
