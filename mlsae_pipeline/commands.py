"""`mlsae sweep` and `mlsae query`: the CLI side of the pipeline (registered in mlsae_core.cli).

`mlsae sweep` materializes every asset of every partition of the current sweep THROUGH
Dagster, stage by stage (per model; per (model x SAE config); the cross-config tables), as
in-process runs recorded in the Dagster instance at $DAGSTER_HOME, so they show in
`dagster dev`'s UI. Unchanged work is skipped (fingerprints), so re-running is cheap.
"""

from __future__ import annotations

import argparse
import os
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
        "--keep_going",
        action="store_true",
        help="continue with the next partition when one fails (report failures at the end)",
    )


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, or ./.dagster_home (created) so runs are recorded for the UI."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path.cwd() / ".dagster_home")
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return Path(home)


def sweep_stages(defs_module: Any, sweep: Any) -> list[tuple[str, tuple[str, ...], str | None]]:
    from mlsae_pipeline.partitions import config_key

    stages: list[tuple[str, tuple[str, ...], str | None]] = []
    for model in sweep.model_keys:
        stages.append((f"model {model}", defs_module.MODEL_ASSETS, model))
    for model in sweep.model_keys:
        for point in sweep.points:
            key = config_key(model, point.key)
            stages.append((f"config {key}", defs_module.CONFIG_ASSETS, key))
    stages.append(("cross-config tables", defs_module.SUMMARY_ASSETS, None))
    return stages


def run_sweep(
    sweep: Any = None,
    data_dir: str | Path | None = None,
    instance: Any = None,
    keep_going: bool = False,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Materialize the whole graph for every partition of `sweep`; returns one row per stage."""
    import dagster as dg

    from mlsae_pipeline import definitions as d
    from mlsae_pipeline.sweep import Sweep, load_sweep

    sw = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    defs = d.build_definitions(sw, data_dir, executor=dg.in_process_executor)
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    assets = [*defs.assets, *(defs.asset_checks or [])]
    resources = dict(defs.resources)
    stages = sweep_stages(d, sw)
    report(
        f"sweep {sw.name} ({sw.path}): {len(sw.models)} model(s) x {len(sw.points)} SAE "
        f"config(s) -> {len(stages)} runs; storage {resources['storage'].root}"
    )
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, (label, selection, partition) in enumerate(stages, start=1):
        report(f"[{i}/{len(stages)}] {label}: {', '.join(selection)} ...")
        t0 = time.perf_counter()
        result = dg.materialize(
            assets,
            selection=list(selection),
            partition_key=partition,
            instance=instance,
            resources=resources,
            raise_on_error=not keep_going,
            tags={"mlsae/sweep": sw.name},
        )
        dt = time.perf_counter() - t0
        skipped = [
            m.asset_key.to_user_string()
            for m in result.get_asset_materialization_events()
            if (m.materialization.metadata.get("skipped") or dg.MetadataValue.bool(False)).value
        ]
        failed_checks = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        status = "ok" if result.success else "FAILED"
        note = f" (unchanged, skipped: {', '.join(skipped)})" if skipped else ""
        if failed_checks:
            note += f" [failed checks: {', '.join(failed_checks)}]"
        report(f"[{i}/{len(stages)}] {label}: {status} in {dt:.1f}s{note}  run {result.run_id[:8]}")
        rows.append(
            {
                "stage": label,
                "success": result.success,
                "seconds": dt,
                "run_id": result.run_id,
                "skipped": skipped,
                "failed_checks": failed_checks,
            }
        )
    report(f"sweep done in {time.perf_counter() - t_all:.1f}s")
    return rows


def sweep(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["MLSAE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    rows = run_sweep(args.sweep, args.data_dir, keep_going=args.keep_going)
    failed = [r["stage"] for r in rows if not r["success"]]
    if failed:
        print(f"mlsae sweep: {len(failed)} stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    from mlsae_pipeline.resources import default_data_dir

    print(f'results: {Path(default_data_dir()) / "results.duckdb"}  (try: mlsae query "...")')
    return 0


# ----- query ----------------------------------------------------------------------------------
def query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help='SQL over the views of results.duckdb, e.g. "SELECT * FROM mmcs"')
    p.add_argument("--db", default=None, help="default: $MLSAE_DATA_DIR/results.duckdb")
    p.add_argument("--max_rows", type=int, default=50, help="rows to print (default 50)")


def format_table(columns: list[str], rows: list[tuple], max_rows: int = 50) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v[:6]) + (", …]" if len(v) > 6 else "]")
        return "NULL" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows[:max_rows]]
    widths = [min(40, max([len(c), *(len(r[i]) for r in cells)])) for i, c in enumerate(columns)]
    lines = ["  ".join(c[:w].rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v[:w].rjust(w) for v, w in zip(r, widths, strict=True)))
    if len(rows) > max_rows:
        lines.append(f"… {len(rows) - max_rows} more rows")
    return "\n".join(lines)


def run_query(sql: str, db: str | Path | None = None) -> tuple[list[str], list[tuple]]:
    import duckdb

    from mlsae_pipeline.resources import default_data_dir

    path = Path(db) if db else Path(default_data_dir()) / "results.duckdb"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `mlsae sweep` (or materialize results_db) first"
        )
    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description or []]
        return columns, cur.fetchall()
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from exc
    finally:
        con.close()


def query(args: argparse.Namespace) -> int:
    columns, rows = run_query(args.sql, args.db)
    print(format_table(columns, rows, args.max_rows))
    return 0
