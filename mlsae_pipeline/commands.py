"""`mlsae sweep`: the CLI side of the pipeline (an "mlsae.commands" entry point of the core CLI).

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


def sweep_stages(defs: Any) -> list[tuple[str, list[Any], str | None]]:
    """(label, asset keys, partition key) per run, derived from the definitions' partitions:
    each model's model-partitioned assets, then each config's config-partitioned assets,
    then the unpartitioned (cross-config) assets."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    kinds: dict[str, tuple[Any, list[Any]]] = {}
    for key in graph.toposorted_asset_keys:
        pdef = graph.get(key).partitions_def
        kind = (
            "cross-config"
            if pdef is None
            else "config"
            if isinstance(pdef, dg.MultiPartitionsDefinition)
            else "model"
        )
        kinds.setdefault(kind, (pdef, []))[1].append(key)
    stages: list[tuple[str, list[Any], str | None]] = []
    for kind in ("model", "config"):
        if kind in kinds:
            pdef, keys = kinds[kind]
            stages += [(f"{kind} {p}", keys, str(p)) for p in pdef.get_partition_keys()]
    if "cross-config" in kinds:
        stages.append(("cross-config tables", kinds["cross-config"][1], None))
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
    stages = sweep_stages(defs)
    report(
        f"sweep {sw.name} ({sw.path}): {len(sw.models)} model(s) x {len(sw.points)} SAE "
        f"config(s) -> {len(stages)} runs; storage {resources['storage'].root}"
    )
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, (label, selection, partition) in enumerate(stages, start=1):
        names = ", ".join(k.to_user_string() for k in selection)
        report(f"[{i}/{len(stages)}] {label}: {names} ...")
        t0 = time.perf_counter()
        result = dg.materialize(
            assets,
            selection=selection,
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


# The `mlsae sweep` command, registered with the core CLI through the "mlsae.commands" entry
# point group (pyproject.toml), so the core never imports the pipeline.
SWEEP_COMMAND = (
    sweep_args,
    sweep,
    "materialize every asset of every partition of the sweep (MLSAE_SWEEP) through Dagster",
)
