"""Asset factories, one module per domain (group): models, training + evaluation, summary."""

from __future__ import annotations

# Bump an asset's code version when its computation changes: Dagster then marks it (and
# what depends on it) stale, and the fingerprint cache recomputes it.
CODE_VERSIONS = {
    "transformer": "2",  # 2: mlsae_core.transformer.resolve_model_path
    "corpus": "2",  # 2: runs.corpus_split resolves the dataset
    "resid_cos_sim": "1",
    "tuned_lens": "1",
    "mlsae": "4",  # 4: --precision (auto: bf16 where native); tuned-lens inputs
    "evaluation": "4",  # 4: the tuned_lens partition column in every table
    "dists_heatmap": "2",  # 2: analyse.write_run_figures (layer_mean_hist)
    "prompt_heatmap": "3",  # 3: the tuned_lens partition column
    "test_summary": "2",  # 2: the tuned_lens partition column
    "dists_layer_std": "3",  # 3: the tuned_lens partition column
    "mmcs": "2",  # 2: the tuned_lens partition column
    "single_layer_comparison": "3",  # 3: the tuned_lens partition column
    "results_db": "2",  # 2: per-run views glob the run directories
}


def eager():
    import dagster as dg

    return dg.AutomationCondition.eager()
