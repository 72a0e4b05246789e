"""Analyse a trained checkpoint in ONE evaluation pass and write every table beside it.

The transformer runs once per batch: test metrics, latent layer distributions, token-vs-
aggregate layer variance and max-activating examples all come from the same forward. The
splice metrics (the costly part: one partial forward per layer) can be limited to the first
`splice_max_tokens` tokens while the other analyses see all `max_tokens`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ANALYSES = ("metrics", "dists", "variance", "examples")

# File names beside the checkpoint (the explorer and the pipeline read these).
FILES = {
    "metrics": "test_metrics.parquet",
    "dists": "latent_dists.parquet",
    "layer_dists": "latent_layer_dists.parquet",
    "dists_summary": "dists_summary.parquet",
    "variance": "layer_variance.parquet",
    "latent_variance": "latent_variance.parquet",
    "examples": "max_examples.parquet",
}


@dataclass
class AnalysisOutputs:
    """What one pass produced: pyarrow tables by name, the files written, raw results."""

    tables: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    metrics_rows: list[dict[str, Any]] = field(default_factory=list)
    partition: dict[str, Any] = field(default_factory=dict)
    dists: Any = None  # analysis.DistsResult
    variance: Any = None  # analysis.VarianceResult
    examples: Any = None  # analysis.ExamplesResult


@dataclass
class OnePass:
    """Raw results of one evaluation pass (nothing written yet)."""

    metrics_rows: list[dict[str, Any]]  # one per layer plus 'avg'
    n_tokens: int
    dists: Any = None  # analysis.DistsResult
    variance: Any = None  # analysis.VarianceResult
    examples: Any = None  # analysis.ExamplesResult


def one_pass(
    transformer: Any,
    sae: Any,
    chunks: Any,
    layers: list[int],
    analyses: tuple[str, ...] = ANALYSES,
    max_tokens: int | None = None,
    batch_size: int = 4,
    splice_max_tokens: int | None = None,
    n_examples: int = 32,
    n_context: int = 4,
    progress: bool = True,
    delta_dtype: str = "auto",
) -> OnePass:
    """Metrics and the chosen analyses from ONE evaluate() pass over `chunks` (TokenChunks).

    Used by `mlsae analyse` and by the pipeline's evaluation asset alike. Without "metrics"
    in `analyses` nothing is spliced (the forward then stops at the last SAE layer).
    """
    from mlsae_core.analysis import LayerDists, MaxExamples, TokenLayerVariance
    from mlsae_core.analysis.examples import sae_row_encoder
    from mlsae_core.evaluate import evaluate

    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    collectors: dict[str, Any] = {}
    if "dists" in analyses:
        collectors["dists"] = LayerDists(sae.n_latents, layers, sae.dead_threshold)
    if "variance" in analyses:
        collectors["variance"] = TokenLayerVariance(sae.n_latents, layers, sae.dead_threshold)
    if "examples" in analyses:
        collectors["examples"] = MaxExamples(
            sae.n_latents, layers, n_examples, n_context, sae.dead_threshold
        )
    masks = chunks.mask()
    result = evaluate(
        transformer,
        sae,
        chunks.tokens,
        masks,
        layers,
        batch_size=batch_size,
        max_tokens=max_tokens,
        splice="metrics" in analyses,
        collectors=list(collectors.values()),
        progress=progress,
        splice_max_tokens=splice_max_tokens,
        delta_dtype=delta_dtype,
    )
    out = OnePass(result.rows, result.n_tokens)
    if "dists" in collectors:
        out.dists = collectors["dists"].result()
    if "variance" in collectors:
        out.variance = collectors["variance"].result()
    if "examples" in collectors:
        # context activations: a second, small pass over only the rows holding examples
        encoder = sae_row_encoder(transformer, sae, chunks.tokens, layers, masks)
        out.examples = collectors["examples"].result(chunks.tokens, transformer.tokenizer, encoder)
    return out


def analyse_checkpoint(
    repo_id: str | Path,
    out_dir: str | Path | None = None,
    analyses: tuple[str, ...] = ANALYSES,
    dataset: str | None = None,
    max_tokens: int = 100_000,
    max_length: int | None = None,
    batch_size: int = 4,
    splice_max_tokens: int | None = None,
    n_examples: int = 32,
    n_context: int = 4,
    device: str = "cpu",
    transformer: Any = None,
    figures: bool = True,
    progress: bool = True,
    delta_dtype: str = "auto",
) -> AnalysisOutputs:
    """Run the chosen analyses over the held-out split in one pass; write Parquet + figures.

    Tables go to `out_dir` (default: the checkpoint directory, where `mlsae explore` looks).
    """
    from mlsae_core import atomic
    from mlsae_core.analysis import tables
    from mlsae_core.runs import load_for_test, partition_values, write_metrics

    setup = load_for_test(repo_id, dataset, max_tokens, max_length, device, transformer)
    sae, layers, chunks = setup.sae, setup.layers, setup.chunks
    result = one_pass(
        setup.transformer,
        sae,
        chunks,
        layers,
        analyses,
        max_tokens=max_tokens,
        batch_size=batch_size,
        splice_max_tokens=splice_max_tokens,
        n_examples=n_examples,
        n_context=n_context,
        progress=progress,
        delta_dtype=delta_dtype,
    )
    part = partition_values(sae)
    out_dir = Path(out_dir) if out_dir is not None else Path(repo_id)
    out = AnalysisOutputs(
        metrics_rows=result.metrics_rows,
        partition=part,
        dists=result.dists,
        variance=result.variance,
        examples=result.examples,
    )
    title = f"{part['model']} x{part['expansion_factor']} k{part['k']} L{part['layers']}"

    def put(name: str, table: Any) -> None:
        path = out_dir / FILES[name]
        atomic.write_parquet(path, table)
        out.tables[name], out.paths[name] = table, path

    if "metrics" in analyses:
        from mlsae_core.runs import metrics_table

        csv_path, pq_path = write_metrics(result.metrics_rows, part, out_dir / "test_metrics.csv")
        out.tables["metrics"] = metrics_table(result.metrics_rows, part)
        out.paths["metrics"], out.paths["metrics_csv"] = pq_path, csv_path
    if out.dists is not None:
        put("dists", tables.latent_dists_table(out.dists, part))
        put("layer_dists", tables.latent_layer_dists_table(out.dists, part))
        put("dists_summary", tables.dists_summary_table(out.dists, part))
        if figures:
            from mlsae_core import figures as figs

            for p in figs.dists_heatmap(out.dists, out_dir / "dists_heatmap", title=title):
                out.paths[f"figure:{p.name}"] = p
            for p in figs.layer_mean_histogram(out.dists, out_dir / "layer_mean_hist", title=title):
                out.paths[f"figure:{p.name}"] = p
    if out.variance is not None:
        put("variance", tables.layer_variance_table(out.variance, part))
        put("latent_variance", tables.latent_variance_table(out.variance, part))
    if out.examples is not None:
        put(
            "examples",
            tables.max_examples_table(out.examples, part, chunks.doc_index, chunks.documents),
        )
    logger.info("analysed %s: wrote %s", repo_id, sorted(p.name for p in out.paths.values()))
    return out
