"""Asset factories, one module per domain (group): models, training + evaluation, summary."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump an asset's code version when its computation changes: Dagster then marks it (and what
# depends on it) unsynced, and `mlsae sweep` (or "Materialize unsynced") recomputes it.
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


def settings_hash(*settings: Any) -> str:
    """A short hash of JSON-ready settings."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def code_version(asset: str, *settings: Any) -> str:
    """`CODE_VERSIONS[asset]`, plus a hash of the sweep settings the asset reads: the sweep
    file is part of the code location, so editing a setting marks exactly the assets that read
    it unsynced (the UI says "has a new code version"; `mlsae sweep` re-runs them)."""
    base = CODE_VERSIONS[asset]
    return f"{base}.{settings_hash(*settings)}" if settings else base


def eager():
    import dagster as dg

    return dg.AutomationCondition.eager()
