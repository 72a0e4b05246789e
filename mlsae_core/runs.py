"""End-to-end runs: a RunSpec -> a trained checkpoint; a checkpoint -> its held-out split.

The CLI and the Dagster pipeline both call these, so a run means the same thing everywhere.
A checkpoint's config.json records where its data came from, so `test` finds the held-out
split of the same corpus without being told.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv

from mlsae_core import atomic, checkpoint, interop
from mlsae_core.chunks import TokenChunks
from mlsae_core.config import ConfigError, DataConfig, EvalConfig, RunSpec, resolve_device, to_dict
from mlsae_core.data import check_context, held_out_split, train_token_budget, transformer_split
from mlsae_core.identity import RUN_ID_FIELDS, resolve_layers, run_id_of
from mlsae_core.layout import RunLayout, StorageLayout
from mlsae_core.lens import LensedActivations, TunedLens
from mlsae_core.lock import refuse_if_locked
from mlsae_core.metrics import METRIC_COLUMNS
from mlsae_core.plan import DATA_KEYS, Plan, decide, run_settings
from mlsae_core.precision import dtype_name, resolve_precision
from mlsae_core.sae import MLSAE
from mlsae_core.train import (
    STATE_DIR,
    ActivationSource,
    LiveActivations,
    dist_info,
    read_state,
    train,
)
from mlsae_core.transformer import ModelShape, Transformer

logger = logging.getLogger(__name__)


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
    return {
        **data_identity(spec),
        "layers": layers,
        "n_model_layers": n_layers,
        "expansion_factor": spec.sae.expansion_factor,
        "max_length": spec.data.max_length,
        "max_tokens": spec.data.max_tokens,
        "seed": spec.train.seed,
        "auxk_coef": spec.sae.auxk_coef,
        "tuned_lens": lens is not None,
        "lens_fingerprint": lens.fingerprint() if lens is not None else None,
    }


def plan(spec: RunSpec, run_dir: str | Path, also_changed: dict | None = None) -> Plan:
    """What training `spec` into `run_dir` does: new, resume, extend, finished or conflict
    (plan.decide against the settings its training state records). A finished run whose
    checkpoint fails `atomic.verify` conflicts, as does anything in `also_changed`."""
    state = Path(run_dir) / STATE_DIR
    if not (state / "state.json").is_file():
        return Plan("new")
    meta = read_state(state)
    precision = resolve_precision(spec.train.precision, resolve_device(spec.train.device))
    lens = TunedLens.load(spec.tuned_lens).fingerprint() if spec.tuned_lens else None
    asked = run_settings(
        to_dict(spec.sae), to_dict(spec.train), dtype_name(precision),
        batch_size=spec.data.batch_size, max_length=spec.data.max_length,
        max_tokens=spec.data.max_tokens,
        world_size=max(spec.train.nproc_per_node, dist_info()[1]),
        inputs=lens, data=data_identity(spec),
    )  # fmt: skip
    changed = dict(also_changed or {})
    if meta.get("done"):
        layout = RunLayout(Path(run_dir))
        try:
            atomic.verify(layout.directory, [layout.weights.name, layout.config.name])
        except atomic.CorruptFileError as exc:
            changed["checkpoint"] = (str(exc), "retrained")
    recorded = meta["run_config"]
    if "data" not in recorded and (Path(run_dir) / "config.json").is_file():  # older states
        config = json.loads((Path(run_dir) / "config.json").read_text())
        recorded["data"] = {k: config[k] for k in DATA_KEYS if k in config}
    return decide(recorded, asked, bool(meta.get("done")), changed)


def prepare(
    spec: RunSpec,
    run_dir: str | Path,
    on_conflict: Literal["refuse", "restart"] = "refuse",
    also_changed: dict | None = None,
) -> Plan:
    """`plan`, acted on: a conflict is refused in one line (the CLI), or the directory is
    cleared so the run starts over (a sweep whose settings changed)."""
    decided = plan(spec, run_dir, also_changed)
    if decided.action == "conflict":
        if on_conflict == "refuse":
            raise ConfigError(decided.refusal(run_dir))
        refuse_if_locked(run_dir)  # never delete what another process is writing
        shutil.rmtree(run_dir)
        logger.info(
            "settings changed (%s): started %s over", "; ".join(decided.describe()), run_dir
        )
    return decided


def data_identity(spec: RunSpec) -> dict[str, Any]:
    """Which model and documents a run reads, as its checkpoint records them."""
    data = {k: getattr(spec.data, k) for k in ("dataset", "text_field", "test_fraction")}
    return {"model_name": spec.model_name, **data, "split_seed": spec.document_seed}


def train_run(
    spec: RunSpec,
    out_dir: str | Path,
    transformer: Transformer | None = None,
    source: ActivationSource | None = None,
    train_chunks: TokenChunks | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    prepared: Plan | None = None,
) -> MLSAE:
    """Train (or resume) the MLSAE described by `spec` into `out_dir`; returns the MLSAE.
    A directory holding other settings is refused (`prepare`), unless the caller has already
    acted on its plan (`prepared`: the sweep restarts such a run instead).

    Loads and checks what `spec` names, then calls `train.train`, the one training entry (it
    holds `out_dir`'s lock). `source` may be an activation cache (mlsae_core.cache) shared by
    a sweep's configs; by default activations are computed live by the transformer.
    """
    device = resolve_device(spec.train.device)  # before loading anything
    if dist_info()[0] == 0:
        refuse_if_locked(out_dir)  # a second writer is refused before minutes of loading
        if prepared is None:
            prepare(spec, out_dir)
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


def train_stored(
    spec: RunSpec,
    layout: StorageLayout,
    model: str,
    run_dir: Path,
    shared_cache: bool = False,
    progress: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    prepared: Plan | None = None,
) -> dict[str, Any]:
    """A sweep's run: `train_run` on the model and the training chunks stored under the
    storage root for `model`; with `shared_cache`, on a float16 cache of every layer over those
    chunks, built by the first config that needs it and shared by the rest (one transformer
    pass per model instead of one per config). Returns `run_summary`."""
    from mlsae_core.cache import ActivationCache

    device = resolve_device(spec.train.device)
    transformer = Transformer.load(spec.model_name, device=device, models_dir=layout.models_dir)
    chunks = TokenChunks.load(layout.corpus_path(model, "train"))
    source = None
    if shared_cache:
        precision = resolve_precision(spec.train.precision, transformer.device)
        cache = ActivationCache.open_or_build(
            layout.cache_dir(model), transformer, chunks.tokens, precision, progress=progress
        )
        source = cache.select(resolve_layers(spec.layers, transformer.n_layers))
    train_run(spec, run_dir, transformer, source, chunks, progress, on_step, prepared)
    return run_summary(run_dir)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """A trained run at a glance: its layers, width and where its training curve ended."""
    from mlsae_core.identity import layers_label
    from mlsae_core.train import read_history

    config = json.loads(RunLayout(run_dir).config.read_text())
    hist = read_history(run_dir)
    last = hist[-1] if hist else {}
    return {
        "checkpoint": str(run_dir),
        "layers": layers_label(config["layers"]),
        "n_layers": len(config["layers"]),
        "n_latents": int(config["n_latents"]),
        "steps": len(hist),
        "tokens": int(last.get("tokens", 0)),
        "final_fvu": float(last.get("fvu", float("nan"))),
        "final_dead_fraction": float(last.get("dead_fraction", float("nan"))),
        "train_seconds": float(last.get("elapsed_s", 0.0)),
        "world_size": dist_info()[1],
    }


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
    chunks: TokenChunks | None = None,
) -> EvalSetup:
    """Load a checkpoint, its transformer, its tuned lens and the held-out split recorded in
    its config (`chunks`: that split already tokenized, as the pipeline's corpus holds it).

    A reference training-module checkpoint (`...-tfm`) carries its transformer's weights:
    those are used, on `model_name`'s architecture; it records no dataset, so one is required.
    """
    device = resolve_device(cfg.device)
    sae = MLSAE.from_pretrained(repo_id, device=device)
    meta = sae.metadata
    model_name = meta.get("model_name")
    tfm = meta.get("source_format") == interop.tfm.FORMAT
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
    if chunks is None:
        chunks = held_out_split(meta, transformer, cfg.max_tokens, dataset, max_length)
    return EvalSetup(sae, transformer, layers, chunks, lens)


def checkpoint_transformer(
    repo_id: str | Path, sae: MLSAE, model_name: str, device: str
) -> Transformer:
    """The transformer a checkpoint evaluates with: the weights inside a reference
    training-module checkpoint (`...-tfm`) on `model_name`'s architecture, else `model_name`."""
    if sae.metadata.get("source_format") == interop.tfm.FORMAT:
        state = interop.tfm.transformer_state(checkpoint.resolve_checkpoint(repo_id))
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
    elif meta.get("source_format") == interop.tfm.FORMAT:
        own = interop.tfm.lens(directory)
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
