"""The Dagster code location: every asset, check, job, schedule and sensor, in one place.

Loaded by `dagster dev` through pyproject's [tool.dagster] (module_name =
"mlsae_pipeline.definitions"), by `dagster asset ...` through -m. Loading parses the sweep
YAML and builds the partitions; torch and transformers are imported only inside asset
bodies, so the code server starts in about a second.

Environment:
    MLSAE_SWEEP      sweep file: a path or a name under data/sweeps/ (default: default)
    MLSAE_DATA_DIR   storage root (default: data/)
    MLSAE_EXECUTOR   multiprocess (default) | in_process | k8s (needs dagster-k8s: pip install .[k8s])
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlsae_pipeline.assets.configs import build_config_assets
from mlsae_pipeline.assets.models import build_model_assets
from mlsae_pipeline.assets.summary import SUMMARY_ASSETS, SUMMARY_CHECKS
from mlsae_pipeline.io import TABLE_ASSETS, ParquetIOManager
from mlsae_pipeline.partitions import sweep_partitions
from mlsae_pipeline.resources import Storage, SweepResource, default_data_dir, executor_from_env
from mlsae_pipeline.run_health import dead_run_monitor
from mlsae_pipeline.sweep import Sweep, load_sweep

MODEL_JOB = dg.define_asset_job(
    "model_assets",
    selection=dg.AssetSelection.groups("models"),
    description="Per model: base transformer, tokenized corpus, residual cosine similarity.",
)
CONFIG_JOB = dg.define_asset_job(
    "config_assets",
    selection=dg.AssetSelection.groups("training", "evaluation", "figures", "exports"),
    description="Per (model x SAE config): train, evaluate (one pass), figures, SAELens export.",
)
SUMMARY_JOB = dg.define_asset_job(
    "summary_tables",
    selection=dg.AssetSelection.groups("summary"),
    description="Cross-config tables, summary figures and the DuckDB results file.",
)
NIGHTLY = dg.ScheduleDefinition(
    name="nightly_summary_refresh",
    job=SUMMARY_JOB,
    cron_schedule="0 3 * * *",
    description="Re-materialize the cross-config tables, summary figures and results_db.",
)
AUTOMATION = dg.AutomationConditionSensorDefinition(
    "mlsae_automation",
    target=dg.AssetSelection.all(),
    description=(
        "Evaluates the eager automation conditions: new or changed configs (new partitions, "
        "updated upstream data versions) flow downstream. Turn it on in the UI "
        "(Automation tab) for hands-off re-runs; `mlsae sweep` does not need it."
    ),
)


def build_definitions(
    sweep: Sweep | str | Path | None = None,
    data_dir: str | Path | None = None,
    executor: object | None = None,
) -> dg.Definitions:
    """Definitions for one sweep file and storage root (tests pass a tiny sweep + temp dir)."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    storage = Storage(root=str(Path(data_dir).resolve()) if data_dir else default_data_dir())
    parts = sweep_partitions(sweep)
    return dg.Definitions(
        assets=[
            *build_model_assets(parts, sweep),
            *build_config_assets(parts, sweep),
            *SUMMARY_ASSETS,
        ],
        asset_checks=SUMMARY_CHECKS,
        jobs=[MODEL_JOB, CONFIG_JOB, SUMMARY_JOB],
        schedules=[NIGHTLY],
        sensors=[AUTOMATION, dead_run_monitor],
        resources={
            "storage": storage,
            "sweep": SweepResource(path=str(sweep.path)),
            "parquet_io_manager": ParquetIOManager(storage=storage),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
        executor=executor if executor is not None else executor_from_env(),
        metadata={
            "sweep": str(sweep.path),
            "storage_root": storage.root,
            "tables": ", ".join(TABLE_ASSETS),
        },
    )


defs = build_definitions()
