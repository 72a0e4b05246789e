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
    from mlsae_core.config import add_data_dir

    p.add_argument(
        "--sweep",
        default=None,
        help="sweep file: a YAML path or a name under data/sweeps/ (default: $MLSAE_SWEEP, "
        "else 'default')",
    )
    add_data_dir(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="only parse and validate the sweep file (offline: no model, data, storage root "
        "or hub is read)",
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


def latest(instance: Any, key: Any, partition: str | None = None, before: int | None = None) -> Any:
    """The asset's last materialization record (of `partition`; None: of any), or None;
    `before`: the last one with a storage id below it."""
    import dagster as dg

    where = dg.AssetRecordsFilter(
        key, asset_partitions=[partition] if partition else None, before_storage_id=before
    )
    records = instance.fetch_materializations(where, limit=1).records
    return records[0] if records else None


def damaged(record: Any, layout: Any, asset: str, partition: str | None) -> str | None:
    """Why a file the materialization wrote fails `atomic.verify`, or None: its metadata's
    `files` (relative to the storage root) and, for a table asset, its Parquet file."""
    from mlsae_core import atomic
    from mlsae_pipeline.io import TABLE_ASSETS, table_path

    meta = record.asset_materialization.metadata or {}
    paths = [layout.root / f for f in (meta["files"].value if "files" in meta else [])]
    paths += [table_path(layout, asset, partition)] if asset in TABLE_ASSETS else []
    for path in paths:
        try:
            atomic.verify(path.parent, [path.name])
        except atomic.CorruptFileError as exc:
            return str(exc)
    return None


def _updated(instance: Any, graph: Any, key: Any, partition: str | None, record: Any) -> list[str]:
    """The parents of `key` with new data since its last materialization `record` read them
    (the input event pointer Dagster recorded, else the record itself): a partition it reads
    materialized since, to another data version than the one it read."""
    import dagster as dg

    from mlsae_pipeline.assets import DATA_VERSION_TAG, INPUT_POINTER_TAG

    tags, out = record.asset_materialization.tags or {}, []
    version = lambda r: (r.asset_materialization.tags or {}).get(DATA_VERSION_TAG)  # noqa: E731
    for parent in graph.get(key).parent_keys:
        pdef = graph.get(parent).partitions_def
        if pdef is None:
            parts: list[str | None] = [None]
        elif partition is None:  # an unpartitioned asset reads every partition
            parts = list(pdef.get_partition_keys())
        elif isinstance(pdef, dg.MultiPartitionsDefinition):
            parts = [partition]
        else:  # a per-model parent of a per-config asset
            parts = [partition.split("|")[0]]
        pointer = tags.get(f"{INPUT_POINTER_TAG}{parent.to_user_string()}")
        read_at = int(pointer or record.storage_id)
        for part in parts:
            now = latest(instance, parent, part)
            if now is None or now.storage_id <= read_at:
                continue
            then = latest(instance, parent, part, before=read_at + 1)
            if then is None or version(then) != version(now):
                out.append(parent.to_user_string())
                break
    return sorted(out)


def launches(defs: Any, instance: Any, job: str, partition: str | None) -> dict:
    """{asset: why it runs} for one stage (job x partition); empty: the stage is up to date.

    From Dagster's record of each asset's last materialization (public instance API): it runs
    when never materialized, when it was made by another code version (which includes the
    sweep settings it reads), when a parent has new data since, or when a file it wrote fails
    `atomic.verify` (nothing read back is trusted). What a launched asset feeds in the same
    stage runs after it (a rebuilt checkpoint may differ)."""
    from mlsae_pipeline.assets import CODE_VERSION_TAG

    graph = defs.resolve_asset_graph()
    layout = defs.resources["storage"].layout
    stage = defs.resolve_job_def(job).asset_layer.selected_asset_keys
    why: dict[Any, str] = {}
    for key in (k for k in graph.toposorted_asset_keys if k in stage):
        record = latest(instance, key, partition)
        tags = (record.asset_materialization.tags or {}) if record else {}
        moved = sorted(k.to_user_string() for k in graph.get(key).parent_keys & why.keys())
        if record is None:
            why[key] = "never materialized"
        elif tags.get(CODE_VERSION_TAG) != graph.get(key).code_version:
            why[key] = (
                f"has a new code version ({tags.get(CODE_VERSION_TAG)} -> {graph.get(key).code_version})"
            )
        elif updated := _updated(instance, graph, key, partition, record):
            why[key] = f"{', '.join(updated)} has new data"
        elif moved:
            why[key] = f"{', '.join(moved)} re-run"
        elif problem := damaged(record, layout, key.to_user_string(), partition):
            why[key] = problem
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
        why = launches(defs, instance, job_name, partition)
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
    from mlsae_core.config import use_data_dir

    data_dir = use_data_dir(args)
    os.environ.setdefault("MLSAE_PROGRESS", "1")  # progress bars for the long steps
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:
        for name in ("alembic", "dagster"):  # instance migrations, code-server chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger().setLevel(logging.WARNING)
    rows = run_sweep(args.sweep, data_dir, keep_going=args.keep_going, verbose=verbose)
    failed = [r["stage"] for r in rows if not r["success"]]
    if failed:
        print(f"mlsae sweep: {len(failed)} stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f'results: {data_dir / "results.duckdb"}  (try: mlsae query "...")')
    return 0


# The `mlsae sweep` command, registered with the core CLI through the "mlsae.commands" entry
# point group (pyproject.toml), so the core never imports the pipeline.
SWEEP_COMMAND = (
    sweep_args,
    sweep,
    "materialize every asset of every partition of the sweep (MLSAE_SWEEP) through Dagster",
)
