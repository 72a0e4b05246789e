"""Analyse a trained checkpoint in ONE evaluation pass and write every table beside it.

The transformer runs once per batch: test metrics, latent layer distributions, token-vs-
aggregate layer variance and max-activating examples all come from the same forward. The
splice metrics (the costly part: one partial forward per layer) can be limited to the first
`splice_max_tokens` tokens while the other analyses see all `max_tokens`.

`one_pass` -> `analysis_tables` is the one path from a checkpoint to its tables: `mlsae
analyse` writes them into the run directory (layout.RunLayout), and the pipeline's evaluation
asset hands the same tables to its IO manager, which writes them to the same file names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mlsae_core import atomic, figures
from mlsae_core.analysis import tables
from mlsae_core.analysis.dists import DistsResult, LayerDists
from mlsae_core.analysis.examples import ExamplesResult, MaxExamples, sae_row_encoder
from mlsae_core.analysis.variance import TokenLayerVariance, VarianceResult
from mlsae_core.chunks import TokenChunks
from mlsae_core.config import EvalConfig
from mlsae_core.evaluate import evaluate
from mlsae_core.layout import RunLayout
from mlsae_core.lens import TunedLens
from mlsae_core.runs import load_for_test, metrics_table, write_metrics_csv
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer

logger = logging.getLogger(__name__)

ANALYSES = ("metrics", "dists", "variance", "examples")


@dataclass
class OnePass:
    """Raw results of one evaluation pass (nothing written yet)."""

    metrics_rows: list[dict[str, Any]]  # one per layer plus 'avg'
    n_tokens: int
    dists: DistsResult | None = None
    variance: VarianceResult | None = None
    examples: ExamplesResult | None = None
    # splice metrics from W(h_spliced - h_clean) (a linear head) or from full logits (None:
    # nothing spliced)
    linear_head: bool | None = None


@dataclass
class AnalysisOutputs:
    """What `analyse_checkpoint` produced: the pass, its tables by name, the files written."""

    result: OnePass
    run_id: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def check_analyses(analyses: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    return tuple(a for a in ANALYSES if a in analyses)


def one_pass(
    transformer: Transformer,
    sae: MLSAE,
    chunks: TokenChunks,
    layers: list[int],
    cfg: EvalConfig,
    analyses: Sequence[str] = ANALYSES,
    progress: bool = True,
    lens: TunedLens | None = None,
) -> OnePass:
    """Metrics and the chosen analyses from ONE evaluate() pass over `chunks` (through the
    run's tuned `lens`, if it was trained with one).

    Without "metrics" in `analyses` nothing is spliced (the forward then stops at the last
    SAE layer).
    """
    analyses = check_analyses(analyses)
    n, kw = sae.n_latents, {"dead_threshold": sae.dead_threshold}
    dists = LayerDists(n, layers, **kw) if "dists" in analyses else None
    variance = TokenLayerVariance(n, layers, **kw) if "variance" in analyses else None
    examples = (
        MaxExamples(n, layers, cfg.n_examples, cfg.n_context, **kw)
        if "examples" in analyses
        else None
    )
    masks = chunks.mask()
    result = evaluate(
        transformer,
        sae,
        chunks.tokens,
        masks,
        layers,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        splice="metrics" in analyses,
        collectors=[c for c in (dists, variance, examples) if c is not None],
        progress=progress,
        splice_max_tokens=cfg.splice_max_tokens,
        delta_dtype=cfg.delta_dtype,
        lens=lens,
    )
    out = OnePass(result.rows, result.n_tokens, linear_head=result.linear_head)
    if dists is not None:
        out.dists = dists.result()
    if variance is not None:
        out.variance = variance.result()
    if examples is not None:
        # context activations: a second, small pass over only the rows holding examples
        encoder = sae_row_encoder(transformer, sae, chunks.tokens, layers, masks, lens)
        out.examples = examples.result(chunks.tokens, transformer.tokenizer, encoder)
    return out


def analysis_tables(result: OnePass, run_id: dict[str, Any], chunks: TokenChunks) -> dict:
    """Every per-run table of one pass, by name (layout.RUN_TABLES), with explicit schemas."""
    out: dict[str, pa.Table] = {}
    if result.metrics_rows:
        out["test_metrics"] = metrics_table(result.metrics_rows, run_id)
    if result.dists is not None:
        out["latent_dists"] = tables.latent_dists_table(result.dists, run_id)
        out["latent_layer_dists"] = tables.latent_layer_dists_table(result.dists, run_id)
        out["dists_summary"] = tables.dists_summary_table(result.dists, run_id)
    if result.variance is not None:
        out["layer_variance"] = tables.layer_variance_table(result.variance, run_id)
        out["latent_variance"] = tables.latent_variance_table(result.variance, run_id)
    if result.examples is not None:
        out["max_examples"] = tables.max_examples_table(
            result.examples, run_id, chunks.doc_index, chunks.documents
        )
    return out


def figure_title(run_id: dict[str, Any]) -> str:
    seed = f" seed {run_id['seed']}" if run_id.get("seed") else ""
    return (
        f"{run_id['model']} x{run_id['expansion_factor']} k{run_id['k']} L{run_id['layers']}{seed}"
    )


def write_run_figures(run: RunLayout, dists: DistsResult, title: str) -> list[Path]:
    """The per-run figures of the layer distributions (PNG + PDF each)."""
    written = figures.dists_heatmap(dists, run.figure_stem("dists_heatmap"), title=title)
    written += figures.layer_mean_histogram(dists, run.figure_stem("layer_mean_hist"), title=title)
    return written


def analyse_checkpoint(
    repo_id: str | Path,
    cfg: EvalConfig,
    analyses: Sequence[str] = ANALYSES,
    out_dir: str | Path | None = None,
    dataset: str | None = None,
    max_length: int | None = None,
    transformer: Transformer | None = None,
    write_figures: bool = True,
    progress: bool = True,
    tuned_lens: str | Path | None = None,
) -> AnalysisOutputs:
    """Run the chosen analyses over the held-out split in one pass; write Parquet + figures.

    Tables go to `out_dir` (default: the checkpoint directory, where `mlsae explore` looks).
    `tuned_lens`: for a checkpoint trained through a lens it carries no copy of.
    """
    setup = load_for_test(repo_id, cfg, dataset, max_length, transformer, tuned_lens)
    result = one_pass(
        setup.transformer, setup.sae, setup.chunks, setup.layers, cfg, analyses, progress,
        setup.lens,
    )  # fmt: skip
    run_id = setup.run_id
    run = RunLayout(Path(out_dir) if out_dir is not None else Path(repo_id))
    out = AnalysisOutputs(result, run_id, analysis_tables(result, run_id, setup.chunks))
    for name, table in out.tables.items():
        atomic.write_parquet(run.table(name), table)
        out.paths[name] = run.table(name)
    if "test_metrics" in out.tables:
        out.paths["test_metrics_csv"] = write_metrics_csv(
            out.tables["test_metrics"], run.metrics_csv
        )
    if write_figures and result.dists is not None:
        for p in write_run_figures(run, result.dists, figure_title(run_id)):
            out.paths[f"figure:{p.name}"] = p
    logger.info("analysed %s: wrote %s", repo_id, sorted(p.name for p in out.paths.values()))
    return out
