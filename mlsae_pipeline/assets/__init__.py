"""Asset factories, one module per domain (group): models, training + evaluation, summary."""

from __future__ import annotations

# Bump an asset's code version when its computation changes: Dagster then marks it (and
# what depends on it) stale, and the fingerprint cache recomputes it.
CODE_VERSIONS = {
    "transformer": "1",
    "corpus": "1",
    "resid_cos_sim": "1",
    "mlsae": "2",  # 2: trains from the shared float16 activation cache
    "evaluation": "2",  # 2: splice logits from dh, bfloat16 GEMM where native
    "dists_heatmap": "1",
    "prompt_heatmap": "1",
    "test_summary": "1",
    "dists_layer_std": "1",
    "mmcs": "1",
    "single_layer_comparison": "1",
    "results_db": "1",
}


def eager():
    import dagster as dg

    return dg.AutomationCondition.eager()
