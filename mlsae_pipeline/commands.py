"""`mlsae sweep`: the CLI side of the pipeline (an "mlsae.commands" entry point of the core CLI).

`mlsae sweep` materializes every asset of every partition of the current sweep THROUGH
Dagster, stage by stage (per model; per (model x SAE config); the cross-config tables), as
in-process runs recorded in the Dagster instance at $DAGSTER_HOME (default <root>/dagster,
so the record moves with the results), so they show in
`dagster dev`'s UI. What to launch is decided here, once per stage, from Dagster's own record
(`launches`): an asset partition runs when it was never materialized, when Dagster marks it
unsynced (a new code version, which includes the sweep settings it reads, or new upstream
data), or when a file it wrote fails `atomic.verify`; so re-running is cheap.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sweep",
        default=None,
        help="sweep file: a YAML path or a name under data/sweeps/ (default: $MLSAE_SWEEP, "
        "else 'default')",
    )
    p.add_argument(
        "--data_dir", default=None, help="storage root (default: $MLSAE_DATA_DIR, else data/)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only parse and validate the sweep file (offline: no model, data or hub is read)",
    )
    p.add_argument(
        "--keep_going",
        action="store_true",
        help="continue with the next partition when one fails (report failures at the end)",
    )


# The instance settings the project starts with (written only where none exist): Dagster's
# run monitoring (start timeouts; killed in-process and default-launcher runs are caught by
# mlsae_pipeline.run_health instead); telemetry off, so the first run prints no banner
# (delete the line to opt in).
DAGSTER_YAML = """\
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
  start_timeout_seconds: 300
  max_resume_run_attempts: 0
telemetry:
  enabled: false
"""


def ensure_dagster_home(root: Path | None = None) -> Path:
    """$DAGSTER_HOME, else `<storage root>/dagster` (created, with dagster.yaml): Dagster's
    record of what was built lives beside what was built, so a moved or copied root keeps it."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        from mlsae_core.layout import data_root

        home = str(((root or data_root()) / "dagster").resolve())
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    settings = Path(home) / "dagster.yaml"
    if not settings.exists():
        settings.write_text(DAGSTER_YAML)
    return Path(home)


def sweep_stages(defs: Any) -> list[tuple[str, str, str | None]]:
    """(label, job name, partition key) per run, derived from the definitions' jobs: every
    partition of each partitioned job (per model, then per config), then each unpartitioned
    job once (the cross-config tables)."""
    stages: list[tuple[str, str, str | None]] = []
    for job in defs.jobs:
        if job.name.startswith("__"):
            continue
        resolved = defs.resolve_job_def(job.name)
        pdef = resolved.partitions_def
        keys = [None] if pdef is None else pdef.get_partition_keys()
        stages += [(job.name if k is None else f"{job.name} {k}", job.name, k) for k in keys]
    return stages


def run_tags(sweep_name: str, job: str, partition: str | None) -> dict[str, str]:
    """Tags that make the Runs page readable (sweep, stage, model, config) and name the
    process that runs it, so a run whose process died can be marked failed."""
    tags = {
        "mlsae/sweep": sweep_name,
        "mlsae/stage": job,
        "mlsae/pid": str(os.getpid()),
        "mlsae/host": socket.gethostname(),
    }
    if partition is not None:
        model, _, config = partition.partition("|")
        tags["mlsae/model"] = model
        if config:
            tags["mlsae/config"] = config
    return tags


def quiet_run_config(verbose: bool) -> dict[str, Any]:
    """Dagster's console logger at WARNING (INFO with -v); the event log keeps everything."""
    level = "INFO" if verbose else "WARNING"
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def outputs(layout: Any, sw: Any, asset: str, partition: str | None) -> list[Path]:
    """The files asset `asset` of `partition` leaves, each recorded in its directory's
    manifest (tables by `atomic.write_parquet`, the rest by the core writer that wrote them)."""
    from mlsae_pipeline import steps
    from mlsae_pipeline.io import TABLE_ASSETS, table_path
    from mlsae_pipeline.partitions import split_config_key

    paths = [table_path(layout, asset, partition)] if asset in TABLE_ASSETS else []
    if partition is not None and "|" in partition:
        model, sae_key = split_config_key(partition)
        run = layout.run(model, sae_key)
        paths += {
            "mlsae": [run.weights, run.config, run.figure("training_curve")],
            "dists_heatmap": [run.figure("dists_heatmap"), run.figure("layer_mean_hist")],
            "prompt_heatmap": [run.figure("prompt_heatmap")],
            "saelens_export": sorted(run.directory.glob("saelens/*/sae_weights.safetensors")),
        }.get(asset, [])
    elif partition is not None:
        paths += {
            "corpus": steps.corpus_files(layout, partition),
            "tuned_lens": steps.lens_files(layout, partition) if sw.wants_lens else [],
            "resid_cos_sim": [Path(f"{layout.model_figure_stem('resid_cos_sim', partition)}.png")],
        }.get(asset, [])
    elif asset == "results_db":
        paths.append(layout.results_db)
    elif asset == "report":
        paths += [layout.report_dir / "report.html", layout.report_dir / "report.md"]
    return paths


def launches(defs: Any, instance: Any, sw: Any, job: str, partition: str | None) -> dict:
    """{asset: why it runs} for one stage (job x partition); empty: the stage is up to date.

    Dagster's stale status decides (the UI's "unsynced"): never materialized, a new code
    version or new upstream data. A file that fails `atomic.verify` is rebuilt too (nothing
    read back is trusted). What a launched asset feeds in the same stage runs after it (a
    rebuilt checkpoint may differ); later stages see its new data version, or its same one."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    from mlsae_pipeline import steps

    graph = defs.resolve_asset_graph()
    stage = defs.resolve_job_def(job).asset_layer.selected_asset_keys
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)
    layout = defs.resources["storage"].layout
    why: dict[Any, str] = {}
    changed: set[Any] = set()
    for key in (k for k in graph.toposorted_asset_keys if k in stage):
        status = resolver.get_status(key, partition)
        moved = sorted(k.to_user_string() for k in graph.get(key).parent_keys & changed)
        if status == StaleStatus.MISSING:
            why[key] = "never materialized"
        elif status == StaleStatus.STALE:
            causes = resolver.get_stale_root_causes(key, partition)
            why[key] = "; ".join(f"{c.asset_key.to_user_string()} {c.reason}" for c in causes)
        elif moved:
            why[key] = f"{', '.join(moved)} re-run"
        elif problem := steps.damaged(outputs(layout, sw, key.to_user_string(), partition)):
            why[key] = problem
        else:
            continue
        changed.add(key)
    for key in list(why):  # a multi-asset (evaluation) computes all its outputs at once
        for sibling in graph.get(key).execution_set_asset_keys - why.keys():
            why[sibling] = f"computed with {key.to_user_string()}"
    return {k.to_user_string(): v for k, v in why.items()}


def run_sweep(
    sweep: Any = None,
    data_dir: str | Path | None = None,
    instance: Any = None,
    keep_going: bool = False,
    report: Callable[[str], None] = print,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Materialize the whole graph for every partition of `sweep`, one named job run per
    stage (model_assets <model>, config_assets <model|config>, summary_tables); returns one
    row per run. Every config is checked against its model's shape before anything runs."""
    import dagster as dg

    from mlsae_pipeline import definitions as d
    from mlsae_pipeline.run_health import fail_dead_runs
    from mlsae_pipeline.sweep import Sweep, load_sweep, validate_against_models

    sw = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    defs = d.build_definitions(sw, data_dir, executor=dg.in_process_executor)
    layout = defs.resources["storage"].layout
    validate_against_models(sw, layout.models_dir)  # before any compute
    if instance is None:
        ensure_dagster_home(layout.root)
        instance = dg.DagsterInstance.get()
    fail_dead_runs(instance, report)
    stages = sweep_stages(defs)
    report(
        f"sweep {sw.name} ({sw.path}): {len(sw.models)} model(s) x {len(sw.points)} SAE "
        f"config(s) -> {len(stages)} runs; storage {layout.root}"
    )
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, (label, job_name, partition) in enumerate(stages, start=1):
        t0 = time.perf_counter()
        why = launches(defs, instance, sw, job_name, partition)
        row = run_stage(defs, instance, sw, job_name, partition, why, keep_going, verbose)
        row.update(stage=label, seconds=time.perf_counter() - t0)
        status = ("ok" if row["success"] else "FAILED") if why else "up to date"
        note = f" (ran {len(why)}, skipped {len(row['skipped'])})" if why else ""
        if row["failed_checks"]:
            note += f" [failed checks: {', '.join(row['failed_checks'])}]"
        run = f"  run {row['run_id'][:8]}" if row["run_id"] else ""
        report(f"[{i}/{len(stages)}] {label}: {status} in {row['seconds']:.1f}s{note}{run}")
        rows.append(row)
    report(f"sweep done in {time.perf_counter() - t_all:.1f}s")
    return rows


def run_stage(
    defs: Any,
    instance: Any,
    sw: Any,
    job_name: str,
    partition: str | None,
    why: dict[str, str],
    keep_going: bool,
    verbose: bool,
) -> dict[str, Any]:
    """One stage's row: its job run in this process over the assets in `why` (none: skipped)."""
    import dagster as dg

    job = defs.resolve_job_def(job_name)
    stage = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    row = {"job": job_name, "partition": partition, "success": True, "run_id": None,
           "launched": why, "skipped": sorted(stage - why.keys()), "failed_checks": []}  # fmt: skip
    if why:
        result = job.execute_in_process(
            partition_key=partition,
            instance=instance,
            raise_on_error=not keep_going,
            tags=run_tags(sw.name, job_name, partition),
            run_config=quiet_run_config(verbose),
            asset_selection=[dg.AssetKey(name) for name in why],
        )
        row["success"], row["run_id"] = result.success, result.run_id
        row["failed_checks"] = [
            e.check_name for e in result.get_asset_check_evaluations() if not e.passed
        ]
    return row


def sweep(args: argparse.Namespace) -> int:
    if args.check:
        from mlsae_pipeline.sweep import load_sweep

        sw = load_sweep(args.sweep)
        print(f"sweep {sw.name} ({sw.path}) is valid: {len(sw.models)} model(s) "
              f"{sw.model_keys} x {len(sw.points)} SAE config(s) {sw.sae_keys}")  # fmt: skip
        return 0
    if args.data_dir:
        os.environ["MLSAE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    os.environ.setdefault("MLSAE_PROGRESS", "1")  # progress bars for the long steps
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:
        for name in ("alembic", "dagster"):  # instance migrations, code-server chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger().setLevel(logging.WARNING)
    rows = run_sweep(args.sweep, args.data_dir, keep_going=args.keep_going, verbose=verbose)
    failed = [r["stage"] for r in rows if not r["success"]]
    if failed:
        print(f"mlsae sweep: {len(failed)} stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    from mlsae_pipeline.resources import default_data_dir

    print(f'results: {Path(default_data_dir()) / "results.duckdb"}  (try: mlsae query "...")')
    return 0


# The `mlsae sweep` command, registered with the core CLI through the "mlsae.commands" entry
# point group (pyproject.toml), so the core never imports the pipeline.
SWEEP_COMMAND = (
    sweep_args,
    sweep,
    "materialize every asset of every partition of the sweep (MLSAE_SWEEP) through Dagster",
)
