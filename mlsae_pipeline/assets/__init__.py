"""Assets, one module per domain (group): models, training + evaluation, summary.

Each asset is a short module-level function whose docstring is its description in the UI;
the per-model and per-config ones get their partitions (which come from the sweep) when
`build_*_assets` decorates them with `asset`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import dagster as dg

# Bump an asset's code version when its computation changes: Dagster then marks it (and what
# depends on it) unsynced, and `mlsae sweep` (or "Materialize unsynced") recomputes it.
CODE_VERSIONS = {
    "transformer": "2",  # 2: mlsae_core.transformer.resolve_model_path
    "corpus": "2",  # 2: data.corpus_split resolves the dataset
    "resid_cos_sim": "1",
    "tuned_lens": "1",
    "mlsae": "4",  # 4: --precision (auto: bf16 where native); tuned-lens inputs
    "evaluation": "7",  # 6: the seed run-id column; 7: fvu_nofirst, fvu_standardized, first_share
    "dists_heatmap": "2",  # 2: analyse.write_run_figures (layer_mean_hist)
    "prompt_heatmap": "4",  # 4: the seed run-id column
    "test_summary": "4",  # 3: the seed run-id column; 4: the first-position metric columns
    "dists_layer_std": "4",  # 4: the seed run-id column
    "mmcs": "3",  # 3: the seed run-id column; every seed of a baseline
    "single_layer_comparison": "5",  # 4: baselines averaged over seeds; 5: first-position metrics
    "claims": "4",  # 3: one failing layer refutes claim 1; 4: judged without the first position
    "report": "4",  # 3: the claim-1 rule by layer; 4: claim 1 without the first position
    "results_db": "2",  # 2: per-run views glob the run directories
    "saelens_export": "1",
    "probes": "1",
    "residual_probes": "1",
}
PARQUET = "parquet_io_manager"
# Tags Dagster writes on every materialization: its record of what made it and from what.
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_POINTER_TAG = "dagster/input_event_pointer/"


def code_version(asset: str, *settings: Any) -> str:
    """`CODE_VERSIONS[asset]`, plus a hash of the sweep settings the asset reads: the sweep
    file is part of the code location, so editing a setting marks exactly the assets that read
    it unsynced (the UI says "has a new code version"; `mlsae sweep` re-runs them)."""
    if not settings:
        return CODE_VERSIONS[asset]
    text = json.dumps(settings, sort_keys=True, default=str)
    return f"{CODE_VERSIONS[asset]}.{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def asset(group: str, kinds: set[str], settings: tuple = (), **kwargs: Any) -> Callable:
    """`@dg.asset` named after the function, in `group`, eager (what changes upstream flows
    down when the automation sensor is on), its code version `code_version(name, *settings)`."""

    def decorate(fn: Callable) -> dg.AssetsDefinition:
        return dg.asset(
            group_name=group,
            kinds=kinds,
            code_version=code_version(fn.__name__, *settings),
            automation_condition=dg.AutomationCondition.eager(),
            **kwargs,
        )(fn)

    return decorate
