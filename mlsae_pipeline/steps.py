"""The assets' steps, as short calls into `mlsae_core` (heavy imports stay inside).

Nothing here knows Dagster and nothing here computes a number: each function fetches the
inputs a core function needs from the storage layout, calls it, and returns its tables plus a
little JSON metadata for the UI. The core's writers record every file in its directory's
manifest (`atomic.record`), so `mlsae sweep` can `atomic.verify` it before skipping it.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae_core import atomic
from mlsae_core.identity import layers_label, resolve_layers, run_id
from mlsae_core.layout import StorageLayout

if TYPE_CHECKING:
    import pyarrow as pa

    from mlsae_core.chunks import TokenChunks
    from mlsae_core.config import RunSpec
    from mlsae_core.transformer import Transformer
    from mlsae_pipeline.sweep import SAEPoint, Sweep


def damaged(paths: list[Path], recorded_only: bool = False) -> str | None:
    """Why the first of `paths` that fails `atomic.verify` cannot be re-used, or None;
    `recorded_only`: files their manifest does not name yet (a run in progress) pass."""
    for path in paths:
        if recorded_only and path.name not in atomic.read_manifest(path.parent):
            continue
        try:
            atomic.verify(path.parent, [path.name])
        except atomic.CorruptFileError as exc:
            return str(exc)
    return None


# ----- models --------------------------------------------------------------------------------
def model_path(layout: StorageLayout, name: str) -> Path:
    """The local directory of model `name` under the storage root (made on first use)."""
    from mlsae_core.transformer import resolve_model_path

    return Path(resolve_model_path(name, layout.models_dir, snapshot=True))


def prepare_model(layout: StorageLayout, name: str) -> dict[str, Any]:
    """Make model `name` loadable from a local directory; metadata for the UI."""
    path = model_path(layout, name)
    cfg = json.loads((path / "config.json").read_text())
    source = path / "mlsae_source.json"  # written by the GGUF conversion and tiny builds
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "model_name": name,
        "path": str(path),
        "source": json.loads(source.read_text())["source"] if source.exists() else "directory",
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "n_layers": int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
        "d_model": int(cfg.get("hidden_size") or cfg.get("n_embd") or 0),
        "vocab_size": int(cfg.get("vocab_size") or 0),
        "weights_mb": round(size / 2**20, 2),
    }


def load_transformer(layout: StorageLayout, name: str, device: str) -> Transformer:
    from mlsae_core.config import resolve_device
    from mlsae_core.transformer import Transformer

    return Transformer.load(str(model_path(layout, name)), device=resolve_device(device))


# ----- corpus --------------------------------------------------------------------------------
def held_out_tokens(sw: Sweep) -> int:
    """Held-out tokens to tokenize: enough for the evaluation and for resid_cos_sim."""
    return max(sw.eval.max_tokens, sw.eval.resid_tokens)


def corpus_files(layout: StorageLayout, model: str) -> list[Path]:
    """The corpus asset's files: train/test TokenChunks and their JSON sidecars."""
    paths = [layout.corpus_path(model, split) for split in ("train", "test")]
    return [f for p in paths for f in (p, p.with_name(p.name + ".json"))]


def build_corpus(layout: StorageLayout, sw: Sweep, model: str) -> dict[str, Any]:
    """Tokenize the train/test split for one model and save both as TokenChunks files."""
    from transformers import AutoTokenizer

    from mlsae_core.runs import corpus_split, train_token_budget
    from mlsae_core.transformer import model_context_length

    path = model_path(layout, sw.model_name(model))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    context = model_context_length(path)
    meta: dict[str, Any] = {"dataset": sw.data.dataset, "max_length": sw.data.max_length}
    # the largest training budget any config of the sweep reads (runs.train_token_budget)
    train_tokens = max(
        train_token_budget(sw.run_spec(p, sw.model_name(model)), sw.train.nproc_per_node)
        for p in sw.points
    )
    for split, budget in (("train", train_tokens), ("test", held_out_tokens(sw))):
        chunks = corpus_split(
            sw.data, sw.train.seed, split, budget, tokenizer, context, layout.sources_dir
        )
        out = layout.corpus_path(model, split)
        out.parent.mkdir(parents=True, exist_ok=True)
        chunks.save(out)
        meta[f"{split}_path"] = str(out)
        meta[f"{split}_chunks"] = len(chunks)
        meta[f"{split}_tokens"] = chunks.n_tokens
        meta[f"{split}_documents"] = len(chunks.documents)
    return meta


def load_chunks(layout: StorageLayout, model: str, split: str) -> TokenChunks:
    from mlsae_core.chunks import TokenChunks

    return TokenChunks.load(layout.corpus_path(model, split))


def lens_files(layout: StorageLayout, model: str) -> list[Path]:
    return [layout.lens_dir(model) / name for name in ("lens.safetensors", "config.json")]


def train_model_lens(layout: StorageLayout, sw: Sweep, model: str) -> dict[str, Any]:
    """The model's tuned lens (lens.fit_lens with the sweep's lens: settings) on its training
    chunks, measured on its test chunks, saved to lenses/<model>/; the KL table as metadata."""
    from mlsae_core.lens import fit_lens

    tr = load_transformer(layout, sw.model_name(model), sw.lens.device)
    train, test = load_chunks(layout, model, "train"), load_chunks(layout, model, "test")
    lens = fit_lens(tr, train, test, sw.lens, progress=terminal_progress())
    lens.save(layout.lens_dir(model))
    rows = lens.kl_table or []
    return {
        "lens": str(layout.lens_dir(model)),
        "kl_logit_lens_mean": sum(r["kl_logit_lens"] for r in rows) / max(1, len(rows)),
        "kl_tuned_lens_mean": sum(r["kl_tuned_lens"] for r in rows) / max(1, len(rows)),
        "kl_by_layer": [
            {k: r[k] for k in ("layer", "kl_logit_lens", "kl_tuned_lens")} for r in rows
        ],
    }


# ----- training ------------------------------------------------------------------------------
def terminal_progress() -> bool:
    """Progress bars on the terminal: `mlsae sweep` turns them on (MLSAE_PROGRESS=1); in the
    UI's runs the event log has the progress lines instead."""
    return os.environ.get("MLSAE_PROGRESS") == "1"


def train_sae(
    spec: RunSpec,
    out_dir: Path,
    chunks_path: Path,
    root: Path,
    on_step: Any = None,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) one MLSAE with runs.train_run; a summary of the run (also under
    torchrun). With `cache_dir`, activations come from a float16 cache of every layer over the
    model's training chunks, built by the first config that needs it and shared by the rest
    of the sweep (one transformer pass per model instead of one per config)."""
    from mlsae_core.chunks import TokenChunks
    from mlsae_core.runs import train_run
    from mlsae_core.train import dist_info, read_history

    transformer = load_transformer(StorageLayout(root), spec.model_name, spec.train.device)
    chunks = TokenChunks.load(chunks_path)
    layers = resolve_layers(spec.layers, transformer.n_layers)
    source = None
    if cache_dir is not None:
        from mlsae_core.cache import ActivationCache
        from mlsae_core.precision import resolve_precision

        cache = ActivationCache.open_or_build(
            cache_dir, transformer, chunks.tokens, progress=terminal_progress(),
            precision=resolve_precision(spec.train.precision, transformer.device),
        )  # fmt: skip
        source = cache.select(layers)
    sae = train_run(
        spec,
        out_dir,
        transformer=transformer,
        source=source,
        train_chunks=chunks,
        progress=progress,
        on_step=on_step,
    )
    _, world = dist_info()
    hist = read_history(out_dir)
    last = hist[-1] if hist else {}
    return {
        "checkpoint": str(out_dir),
        "layers": layers_label(layers),
        "n_layers": len(layers),
        "n_latents": int(sae.n_latents),
        "steps": len(hist),
        "tokens": int(last.get("tokens", 0)),
        "final_fvu": float(last.get("fvu", float("nan"))),
        "final_dead_fraction": float(last.get("dead_fraction", float("nan"))),
        "train_seconds": float(last.get("elapsed_s", 0.0)),
        "world_size": world,
    }


def training_curve(layout: StorageLayout, model: str, sae_key: str) -> list[Path]:
    """The run's training curve figure, from its history.parquet."""
    from mlsae_core import figures
    from mlsae_core.train import read_history

    run = layout.run(model, sae_key)
    hist = read_history(run.directory)
    return figures.training_curve_figure(
        hist, run.figure_stem("training_curve"), f"{model} {sae_key}"
    )


def settings_changes(run_dir: Path, spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """{setting: (recorded, now)} for every setting the run directory records (its
    training state's run config and its config.json) that `spec` changes; {} for a new run.
    n_chunks is left out: it follows from the data settings (and grows with max_tokens)."""
    from mlsae_core.config import resolve_device, to_dict
    from mlsae_core.precision import dtype_name, resolve_precision
    from mlsae_core.train import STATE_DIR

    state, config = run_dir / STATE_DIR / "state.json", run_dir / "config.json"
    if not state.is_file() or not config.is_file():
        return {}
    run_config = json.loads(state.read_text())["run_config"]
    recorded = {**json.loads(config.read_text()), **_flat(run_config)}
    precision = resolve_precision(spec.train.precision, resolve_device(spec.train.device))
    now = {
        **_flat({"sae": to_dict(spec.sae), "train": to_dict(spec.train)}),
        "train.precision": dtype_name(precision),  # recorded resolved ("auto" per machine)
        "batch_size": spec.data.batch_size,
        "max_length": spec.data.max_length,
        "max_tokens": spec.data.max_tokens,
        "world_size": spec.train.nproc_per_node,
        "model_name": spec.model_name,
        "dataset": spec.data.dataset,
        "text_field": spec.data.text_field,
        "test_fraction": spec.data.test_fraction,
        "split_seed": spec.document_seed,
        "tuned_lens": spec.tuned_lens is not None,
    }
    if spec.tuned_lens is not None:
        from mlsae_core.lens import TunedLens

        now["lens_fingerprint"] = TunedLens.load(spec.tuned_lens).fingerprint()
    return {
        key: (recorded.get(key), value)
        for key, value in now.items()
        if key in recorded and recorded[key] != value
    }


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def reconcile_run(run: Any, spec: RunSpec, code_change: dict) -> tuple[dict, str]:
    """({setting: (recorded, now)}, what training does) for the run directory: "trained" when
    nothing changed (new, resumed or finished); "extended" when only a larger token budget
    changed (the core continues the finished run to the weights one longer run reaches,
    train._is_extension); else "restarted", after deleting the directory (other settings, a
    new mlsae code version in `code_change`, or a checkpoint failing `atomic.verify`)."""
    import shutil

    changes = {**settings_changes(run.directory, spec), **code_change}
    if problem := damaged([run.weights, run.config], recorded_only=True):
        changes["checkpoint"] = (problem, "retrained")  # the pipeline's own output
    if not changes:
        return changes, "trained"
    budget = changes.get("max_tokens")
    if set(changes) == {"max_tokens"} and budget[1] > budget[0]:
        return changes, "extended"
    shutil.rmtree(run.directory)
    return changes, "restarted"


# ----- evaluation ----------------------------------------------------------------------------
def _run_setup(layout: StorageLayout, sw: Sweep, model: str, point: SAEPoint) -> tuple:
    """(transformer, MLSAE, layers, partition columns, the run's tuned lens or None)."""
    from mlsae_core.runs import checkpoint_lens
    from mlsae_core.sae import MLSAE

    tr = load_transformer(layout, sw.model_name(model), sw.eval.device)
    run_dir = layout.run(model, point.key).directory
    sae = MLSAE.from_pretrained(run_dir, device=str(tr.device))
    layers = resolve_layers(point.layers, tr.n_layers)
    part = run_id(model, point.expansion_factor, point.k, layers, point.tuned_lens, point.seed)
    return tr, sae, layers, part, checkpoint_lens(run_dir, sae.metadata, tr)


def evaluate(
    layout: StorageLayout, sw: Sweep, model: str, point: SAEPoint
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """analyse.one_pass -> analyse.analysis_tables over the model's test chunks: every
    per-run table by name, and metadata per table for the UI."""
    from mlsae_core.analyse import analysis_tables, one_pass
    from mlsae_core.evaluate import resolve_delta_dtype

    tr, sae, layers, part, lens = _run_setup(layout, sw, model, point)
    test = load_chunks(layout, model, "test")
    result = one_pass(tr, sae, test, layers, sw.eval, progress=terminal_progress(), lens=lens)
    out = analysis_tables(result, part, test)
    avg = next(r for r in result.metrics_rows if r["layer"] == "avg")
    dtype = str(resolve_delta_dtype(sw.eval.delta_dtype, tr.device)).removeprefix("torch.")
    meta = {
        "test_metrics": {
            "n_tokens": result.n_tokens,
            "splice_tokens": sw.eval.spliced_tokens,
            "delta_dtype": dtype,
            "splice_path": {True: "logit difference (linear head)", False: "full logits"}.get(
                result.linear_head, "none"
            ),
            **{k: avg[k] for k in ("fvu", "l0", "dead", "dce")},
        },
        "latent_dists": {"n_live": int(result.dists.live.sum()), "n_latents": sae.n_latents},
        "max_examples": {"n_examples": len(result.examples)},
    }
    return out, meta


def dists_figures(
    layout: StorageLayout, sw: Sweep, model: str, sae_key: str, layer_dists: pa.Table
) -> tuple[list[Path], dict[str, Any]]:
    """The run's layer-distribution figures (analyse.write_run_figures, as `mlsae analyse`
    draws them) from its latent_layer_dists table: the PNGs and metadata."""
    from mlsae_core.analyse import figure_title, write_run_figures
    from mlsae_core.analysis.tables import dists_from_layer_table

    dists = dists_from_layer_table(layer_dists)
    point = sw.point(sae_key)
    title = figure_title(
        run_id(model, point.expansion_factor, point.k, dists.layers, seed=point.seed)
    )
    written = write_run_figures(layout.run(model, sae_key), dists, title)
    pngs = [p for p in written if p.suffix == ".png"]
    return pngs, {"files": [str(p) for p in written], "n_live": int(dists.live.sum())}


def prompt_heatmap(
    layout: StorageLayout, sw: Sweep, model: str, point: SAEPoint
) -> tuple[pa.Table, dict[str, Any]]:
    """The sweep's prompt through the MLSAE: the long-form table, the figure in the run dir."""
    from mlsae_core import figures
    from mlsae_core.analysis import prompts, tables

    tr, sae, layers, part, lens = _run_setup(layout, sw, model, point)
    heat = prompts.prompt_heatmap(tr, sae, layers, prompt=sw.eval.prompt, lens=lens)
    run = layout.run(model, point.key)
    figures.prompt_heatmap_figure(heat, run.figure_stem("prompt_heatmap"))
    meta = {"n_latents_active": int(heat.latents.numel()), "tokens": " ".join(heat.tokens)}
    return tables.prompt_heatmap_table(heat, part), meta


def resid_cos_sim(layout: StorageLayout, sw: Sweep, model: str) -> tuple[pa.Table, dict]:
    """Adjacent-layer cosine similarity over eval.resid_tokens test tokens (table + figure)."""
    from mlsae_core import figures
    from mlsae_core.analysis import geometry, tables

    tr = load_transformer(layout, sw.model_name(model), sw.eval.device)
    test = load_chunks(layout, model, "test")
    n = min(len(test), max(1, math.ceil(sw.eval.resid_tokens / test.tokens.shape[1])))
    source = geometry.transformer_batches(
        tr, test.tokens[:n], test.mask()[:n], None, sw.eval.batch_size
    )
    res = geometry.resid_cos_sim(source, list(range(tr.n_layers)))
    stem = layout.model_figure_stem("resid_cos_sim", model)
    figures.resid_cos_sim_figure(res, stem, title=f"{model}: residual stream")
    return tables.resid_cos_sim_table(res, {"model": model}), {"n_tokens": res.n_tokens}


def decoders(layout: StorageLayout, sw: Sweep) -> tuple[list[tuple[dict, Any]], list[str]]:
    """(partition, decoder) of every trained config of the sweep, and the configs missing."""
    from mlsae_core.analysis.summaries import run_decoder

    found, missing = [], []
    for model in sw.model_keys:
        for point in sw.points:
            run = layout.run(model, point.key)
            if run.weights.exists():
                found.append(run_decoder(run.directory))
            else:
                missing.append(f"{model}|{point.key}")
    return found, missing


# ----- the UI --------------------------------------------------------------------------------
def inline_png(path: Path, alt: str = "figure") -> str:
    """Markdown embedding a PNG (base64) so the Dagster UI shows it inline."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def curve_markdown(run: Any) -> str:
    """The training curve inline, with every tenth row of the history beside it."""
    from mlsae_core.train import read_history

    hist = read_history(run.directory)
    every = max(1, len(hist) // 10)
    rows = "\n".join(
        f"| {r['step']} | {r['tokens']} | {r['fvu']:.4f} | {r['dead_fraction']:.3f} | "
        f"{r['l0']:.1f} |"
        for r in hist[::every] + hist[-1:]
    )
    table = "| step | tokens | fvu | dead | l0 |\n|---|---|---|---|---|\n" + rows
    return inline_png(run.figure("training_curve"), "training curve") + "\n\n" + table


def plain(value: Any) -> Any:
    """JSON-ready metadata: NaN -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return plain(value.item()) if hasattr(value, "item") else str(value)
