"""`mlsae figures NAME`: the original's figure scripts, over checkpoints analysed beforehand.

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
from mlsae_core.identity import model_slug, resolve_layers, run_id_of, run_slug
from mlsae_core.layout import RunLayout
from mlsae_core.runs import checkpoint_lens, transformer_split
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


def _need_repos(args: argparse.Namespace) -> list[Path]:
    if not args.repo_id:
        raise ValueError(f"figures {args.name} needs --repo_id with one or more checkpoints")
    return [Path(r) for r in args.repo_id]


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


def run_figure(args: argparse.Namespace) -> list[Path]:
    """Dispatch on args.name; returns every file written."""
    out: Path = args.out
    written: list[Path] = []
    if args.name == "resid_cos_sim":
        transformer = Transformer.load(args.model_name, device=resolve_device(args.device))
        data = DataConfig(dataset=args.dataset, max_length=args.max_length)
        chunks = transformer_split(transformer, data, 0, "test", args.resid_tokens)
        source = geometry.transformer_batches(
            transformer, chunks.tokens, chunks.mask(), batch_size=args.batch_size
        )
        result = geometry.resid_cos_sim(source)
        slug = model_slug(args.model_name)
        table = tables.resid_cos_sim_table(result, {"model": slug})
        written.append(_write_table(out / f"resid_cos_sim_{slug}.parquet", table))
        written += figures.resid_cos_sim_figure(result, out / f"resid_cos_sim_{slug}", title=slug)
        return written

    repos = _need_repos(args)
    if args.name == "dists_heatmaps":
        for repo in repos:
            slug = run_slug(_run_id(repo))
            written += figures.dists_heatmap(load_dists(repo), out / f"dists_heatmap_{slug}", slug)
    elif args.name in _WITH_REFERENCE_CSV:
        build, csv_rows, write_csv = _WITH_REFERENCE_CSV[args.name]
        table = build(repos)
        written.append(_write_table(out / f"{args.name}.parquet", table))
        write_csv(out / f"{args.name}.csv", csv_rows(table))
        written.append(out / f"{args.name}.csv")
    elif args.name == "prompt_heatmaps":
        loaded: dict[str, Transformer] = {}
        for repo in repos:
            sae = MLSAE.from_pretrained(repo)
            name = sae.metadata["model_name"]
            transformer = loaded.setdefault(name, Transformer.load(name))
            layers = resolve_layers(sae.metadata.get("layers"), transformer.n_layers)
            lens = checkpoint_lens(repo, sae.metadata, transformer)
            heat = prompt_heatmap(transformer, sae, layers, args.prompt, lens=lens)
            slug = run_slug(run_id_of(sae))
            written += figures.prompt_heatmap_figure(heat, out / f"prompt_heatmap_{slug}")
    elif args.name == "test_summary":
        metrics = concat_test_metrics(repos)
        table = summaries.summarize_test_metrics(metrics)
        written.append(_write_table(out / "test_summary.parquet", table))
        # the reference's CSVs also give each config's dictionary size
        saes = map(MLSAE.from_pretrained, repos)
        n_latents = {run_slug(run_id_of(sae)): sae.n_latents for sae in saes}
        rows = [{**r, "n_latents": n_latents[run_slug(r)]} for r in metrics.to_pylist()]
        written += tables.write_reference_test_csvs(rows, out)
        written += figures.summary_figures(table, out)
    elif args.name == "decoder_sim":
        for repo in repos:
            sae = MLSAE.from_pretrained(repo)
            dists = load_dists(repo)
            hist = geometry.decoder_sim_vs_layer_distance(
                sae.decoder.weight.detach(), dists.layer_mean, dists.n_layers
            )
            slug = run_slug(run_id_of(sae))
            written += figures.decoder_sim_figure(hist, out / f"decoder_sim_{slug}", slug)
    return written
