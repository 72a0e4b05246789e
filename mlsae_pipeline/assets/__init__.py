"""Asset factories, one module per domain (group): models, training + evaluation, summary."""

from __future__ import annotations

# Bump an asset's code version when its computation changes: Dagster then marks it (and
# what depends on it) stale, and the fingerprint cache recomputes it.
CODE_VERSIONS = {
    "transformer": "2",  # 2: mlsae_core.transformer.resolve_model_path
    "corpus": "2",  # 2: runs.corpus_split resolves the dataset
    "resid_cos_sim": "1",
    "mlsae": "3",  # 3: the checkpoint records the sweep's model name, not its directory
    "evaluation": "3",  # 3: every table of analyse.analysis_tables, in the run directory
    "dists_heatmap": "2",  # 2: analyse.write_run_figures (layer_mean_hist)
    "prompt_heatmap": "2",  # 2: the table through the IO manager
    "test_summary": "1",
    "dists_layer_std": "2",  # 2: from dists_summary (analysis.dists.describe)
    "mmcs": "1",
    "single_layer_comparison": "2",  # 2: int32 expansion_factor/k (mlsae_core.identity)
    "results_db": "2",  # 2: per-run views glob the run directories
}


def eager():
    import dagster as dg

    return dg.AutomationCondition.eager()
