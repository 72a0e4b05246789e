"""`mlsae figures NAME`: the original's figure scripts, over checkpoints analysed beforehand;
one function per NAME, reading only that figure's flags.

Multi-checkpoint figures read the tables `mlsae analyse`/`mlsae dists` wrote into each run
directory (running the missing analysis when a table is absent), so a figure never costs a
second pass over the model. The cross-config tables (test_summary, dists_layer_std, mmcs) are
built by `analysis.summaries`, the same functions as the pipeline's summary assets; the
reference's CSVs are derived from those tables.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from mlsae_core import atomic, figures
from mlsae_core.analyse import analyse_checkpoint
from mlsae_core.analysis import geometry, summaries, tables
from mlsae_core.analysis.dists import DistsResult
from mlsae_core.analysis.prompts import prompt_heatmap
from mlsae_core.analysis.tables import dists_from_layer_table
from mlsae_core.config import DataConfig, EvalConfig, resolve_device
from mlsae_core.data import transformer_split
from mlsae_core.identity import model_slug, resolve_layers, run_id_of, run_slug
from mlsae_core.layout import RunLayout
from mlsae_core.runs import checkpoint_lens
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer

logger = logging.getLogger(__name__)


def load_dists(checkpoint: str | Path) -> DistsResult:
    """The DistsResult saved in latent_layer_dists.parquet (computed if missing or corrupt)."""
    run = RunLayout(Path(checkpoint))
    path = run.table("latent_layer_dists")
    if path.exists():
        try:
            return dists_from_layer_table(atomic.read_parquet(path))
        except atomic.CorruptFileError as exc:  # derived data: computed again
            logger.warning("%s; recomputing", exc)
    else:
        logger.info("%s has no layer distributions yet: computing them", checkpoint)
    out = analyse_checkpoint(checkpoint, EvalConfig(), analyses=("dists",), write_figures=False)
    return out.result.dists


def _run_id(repo: Path) -> dict[str, Any]:
    return run_id_of(MLSAE.from_pretrained(repo))


# ----- the cross-config tables (the pipeline's summary assets compute the same) -------------
def concat_test_metrics(repos: list[Path]) -> pa.Table:
    """Every run's test_metrics table, concatenated."""
    parts = []
    for repo in repos:
        path = RunLayout(repo).table("test_metrics")
        if not path.exists():
            raise ValueError(f"{path} is missing: run `mlsae test --repo_id {repo}` first")
        parts.append(atomic.read_parquet(path))
    return pa.concat_tables(parts)


def dists_layer_std_of(repos: list[Path]) -> pa.Table:
    """summaries.dists_layer_std over the runs' layer distributions."""
    rows = [tables.dists_summary_table(load_dists(r), _run_id(r)) for r in repos]
    return summaries.dists_layer_std(pa.concat_tables(rows))


def mmcs_of(repos: list[Path]) -> pa.Table:
    """summaries.mmcs over the runs' decoders."""
    return summaries.mmcs([summaries.run_decoder(r) for r in repos])


# name -> (build the table, its rows as the reference's CSV has them, write that CSV)
_WITH_REFERENCE_CSV = {
    "dists_layer_std": (
        dists_layer_std_of,
        summaries.dists_layer_std_csv_rows,
        tables.write_dists_layer_std_csv,
    ),
    "mmcs": (mmcs_of, summaries.mmcs_csv_rows, tables.write_mmcs_csv),
}


def _write_table(path: Path, table: pa.Table) -> Path:
    atomic.write_parquet(path, table)
    return path


# ----- one function per `mlsae figures NAME`: its args are that figure's flags ----------------
def resid_cos_sim(args: argparse.Namespace) -> list[Path]:
    transformer = Transformer.load(args.model_name, device=resolve_device(args.device))
    data = DataConfig(dataset=args.dataset, max_length=args.max_length)
    chunks = transformer_split(transformer, data, 0, "test", args.resid_tokens)
    source = geometry.transformer_batches(
        transformer, chunks.tokens, chunks.mask(), batch_size=args.batch_size
    )
    result = geometry.resid_cos_sim(source)
    slug = model_slug(args.model_name)
    table = tables.resid_cos_sim_table(result, {"model": slug})
    written = [_write_table(args.out / f"resid_cos_sim_{slug}.parquet", table)]
    return written + figures.resid_cos_sim_figure(
        result, args.out / f"resid_cos_sim_{slug}", title=slug
    )


def dists_heatmaps(args: argparse.Namespace) -> list[Path]:
    written: list[Path] = []
    for repo in map(Path, args.repo_id):
        slug = run_slug(_run_id(repo))
        written += figures.dists_heatmap(load_dists(repo), args.out / f"dists_heatmap_{slug}", slug)
    return written


def _with_reference_csv(name: str, args: argparse.Namespace) -> list[Path]:
    build, csv_rows, write_csv = _WITH_REFERENCE_CSV[name]
    table = build([Path(r) for r in args.repo_id])
    written = [_write_table(args.out / f"{name}.parquet", table)]
    write_csv(args.out / f"{name}.csv", csv_rows(table))
    return [*written, args.out / f"{name}.csv"]


def dists_layer_std(args: argparse.Namespace) -> list[Path]:
    return _with_reference_csv("dists_layer_std", args)


def mmcs(args: argparse.Namespace) -> list[Path]:
    return _with_reference_csv("mmcs", args)


def prompt_heatmaps(args: argparse.Namespace) -> list[Path]:
    loaded: dict[str, Transformer] = {}
    device = resolve_device(args.device)
    written: list[Path] = []
    for repo in map(Path, args.repo_id):
        sae = MLSAE.from_pretrained(repo, device=device)
        name = sae.metadata["model_name"]
        transformer = loaded.setdefault(name, Transformer.load(name, device=device))
        layers = resolve_layers(sae.metadata.get("layers"), transformer.n_layers)
        lens = checkpoint_lens(repo, sae.metadata, transformer)
        heat = prompt_heatmap(transformer, sae, layers, args.prompt, lens=lens)
        slug = run_slug(run_id_of(sae))
        written += figures.prompt_heatmap_figure(heat, args.out / f"prompt_heatmap_{slug}")
    return written


def test_summary(args: argparse.Namespace) -> list[Path]:
    repos = [Path(r) for r in args.repo_id]
    metrics = concat_test_metrics(repos)
    table = summaries.summarize_test_metrics(metrics)
    written = [_write_table(args.out / "test_summary.parquet", table)]
    # the reference's CSVs also give each config's dictionary size
    n_latents = {
        run_slug(run_id_of(sae)): sae.n_latents for sae in map(MLSAE.from_pretrained, repos)
    }
    rows = [{**r, "n_latents": n_latents[run_slug(r)]} for r in metrics.to_pylist()]
    written += tables.write_reference_test_csvs(rows, args.out)
    return written + figures.summary_figures(table, args.out)


def decoder_sim(args: argparse.Namespace) -> list[Path]:
    written: list[Path] = []
    for repo in map(Path, args.repo_id):
        sae = MLSAE.from_pretrained(repo)
        dists = load_dists(repo)
        hist = geometry.decoder_sim_vs_layer_distance(
            sae.decoder.weight.detach(), dists.layer_mean, dists.n_layers
        )
        slug = run_slug(run_id_of(sae))
        written += figures.decoder_sim_figure(hist, args.out / f"decoder_sim_{slug}", slug)
    return written
