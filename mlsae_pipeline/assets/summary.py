"""Group `summary`: tables over every config of the sweep, and the DuckDB results file.

These are unpartitioned and read all partitions of their upstream tables (missing ones are
skipped), so `dagster asset materialize --select mmcs` works whenever some checkpoints exist.
"""

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_pipeline.assets import CODE_VERSIONS, eager
from mlsae_pipeline.resources import Storage, SweepResource

GROUP = "summary"
PARTITION_COLS = ("model", "expansion_factor", "k", "layers")
COMPARE_METRICS = ("mse", "fvu", "l0", "dead", "dce", "kl", "loss_recovered")
# asset -> is it partitioned (one Parquet file per partition, read with a glob)?
TABLE_ASSETS = {
    "test_metrics": True,
    "latent_dists": True,
    "max_examples": True,
    "resid_cos_sim": True,
    "test_summary": False,
    "dists_layer_std": False,
    "mmcs": False,
    "single_layer_comparison": False,
}
# Extra views: Parquet files the pipeline writes outside the IO manager.
EXTRA_VIEWS = {
    "prompt_heatmap": "tables/prompt_heatmap/*.parquet",
    "training_history": "saes/*/*/history.parquet",
}


def _describe(values: list[float]) -> dict[str, float]:
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "var": math.nan, "std": math.nan, "sem": math.nan}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    std = math.sqrt(var) if n > 1 else math.nan
    return {"mean": mean, "var": var, "std": std, "sem": std / math.sqrt(n) if n > 1 else math.nan}


def _n_layers(label: str) -> int:
    if "-" in label:
        lo, hi = label.split("-")
        return int(hi) - int(lo) + 1
    return len(label.split(","))


def _is_single(label: str) -> bool:
    return label.isdigit()


def _all_fps(storage: Storage, sweep: Any, asset: str) -> list[Any]:
    """Fingerprints of every config partition of `asset` (None where not materialized)."""
    from mlsae_pipeline.partitions import config_key
    from mlsae_pipeline.state import upstream_fp

    return [
        upstream_fp(storage, asset, config_key(m, p.key))
        for m in sweep.model_keys
        for p in sweep.points
    ]


def _version(name: str, storage: Storage, sweep: SweepResource, upstream: str) -> str:
    from mlsae_pipeline.state import fingerprint

    return fingerprint(CODE_VERSIONS[name], _all_fps(storage, sweep.load(), upstream))


def _meta(table: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from mlsae_pipeline.io import md_table

    return {"table": dg.MetadataValue.md(md_table(table, max_rows=30)), **(extra or {})}


def build_summary_assets() -> list[Any]:
    import pyarrow as pa  # cheap next to dagster; tables below are built with it

    @dg.asset(
        name="test_summary",
        group_name=GROUP,
        ins={"test_metrics": dg.AssetIn("test_metrics")},
        io_manager_key="parquet_io_manager",
        kinds={"parquet", "matplotlib"},
        code_version=CODE_VERSIONS["test_summary"],
        automation_condition=eager(),
        description=(
            "One row per config (model, expansion_factor, k, layers) with the test metrics "
            "averaged over layers, plus figures of each metric by k and by expansion factor."
        ),
    )
    def test_summary(
        context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource, test_metrics: Any
    ):
        import pyarrow.compute as pc

        from mlsae_core import figures
        from mlsae_pipeline import runtime

        avg = test_metrics.filter(pc.equal(test_metrics.column("layer"), "avg")).drop(["layer"])
        n_layers = pa.array([_n_layers(x) for x in avg.column("layers").to_pylist()], pa.int64())
        avg = avg.add_column(4, "n_layers", n_layers)
        avg = avg.sort_by([(c, "ascending") for c in PARTITION_COLS])
        out_dir = storage.path / "figures" / "summary"
        md = ""
        try:
            written = figures.summary_figures(avg, out_dir, metrics=("fvu", "l0", "dce"))
            pngs = [p for p in written if p.suffix == ".png"]
            md = "\n\n".join(runtime.inline_png(p, p.stem) for p in pngs[:2])
        except ValueError as exc:  # nothing to plot
            context.log.warning("summary figures skipped: %s", exc)
        meta = _meta(avg, {"figures": dg.MetadataValue.path(str(out_dir))})
        if md:
            meta["plots"] = dg.MetadataValue.md(md)
        fp = _version("test_summary", storage, sweep, "evaluation")
        return dg.Output(avg, metadata=meta, data_version=dg.DataVersion(fp))

    @dg.asset(
        name="dists_layer_std",
        group_name=GROUP,
        ins={"latent_dists": dg.AssetIn("latent_dists")},
        io_manager_key="parquet_io_manager",
        kinds={"parquet"},
        code_version=CODE_VERSIONS["dists_layer_std"],
        automation_condition=eager(),
        description=(
            "Per config: mean/var/std/sem of each live latent's layer_std (how spread over "
            "layers latents are), and the same divided by n_layers (*_rel), as the paper's tables."
        ),
    )
    def dists_layer_std(storage: Storage, sweep: SweepResource, latent_dists: Any):
        groups: dict[tuple, list[float]] = {}
        counts: dict[tuple, list[int]] = {}
        for r in latent_dists.select([*PARTITION_COLS, "layer_std", "live"]).to_pylist():
            key = tuple(r[c] for c in PARTITION_COLS)
            counts.setdefault(key, [0, 0])
            counts[key][0] += 1
            groups.setdefault(key, [])
            if r["live"]:
                counts[key][1] += 1
                groups[key].append(float(r["layer_std"]))
        rows = []
        for key in sorted(groups):
            n_layers = _n_layers(key[3])
            row: dict[str, Any] = dict(zip(PARTITION_COLS, key, strict=True))
            row.update(n_layers=n_layers, n_latents=counts[key][0], n_live=counts[key][1])
            row.update(_describe(groups[key]))
            rel = _describe([v / n_layers for v in groups[key]])
            row.update({f"{k}_rel": v for k, v in rel.items()})
            rows.append(row)
        schema = pa.schema(
            [
                ("model", pa.string()),
                ("expansion_factor", pa.int32()),
                ("k", pa.int32()),
                ("layers", pa.string()),
                ("n_layers", pa.int32()),
                ("n_latents", pa.int64()),
                ("n_live", pa.int64()),
                *[(s, pa.float64()) for s in ("mean", "var", "std", "sem")],
                *[(f"{s}_rel", pa.float64()) for s in ("mean", "var", "std", "sem")],
            ]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        fp = _version("dists_layer_std", storage, sweep, "evaluation")
        return dg.Output(table, metadata=_meta(table), data_version=dg.DataVersion(fp))

    @dg.asset(
        name="mmcs",
        group_name=GROUP,
        deps=["mlsae"],
        io_manager_key="parquet_io_manager",
        kinds={"parquet", "pytorch"},
        code_version=CODE_VERSIONS["mmcs"],
        automation_condition=eager(),
        description=(
            "Mean max cosine similarity of decoder columns, read from every config's "
            "checkpoint: within each dictionary (reference='self') and between each MLSAE and "
            "the single-layer SAEs of the same model, expansion factor and k "
            "(reference='layers=<l>')."
        ),
    )
    def mmcs(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_core.analysis import geometry, tables
        from mlsae_core.runs import layers_label
        from mlsae_core.sae import read_checkpoint_config, read_checkpoint_weights
        from mlsae_pipeline.io import read_table
        from mlsae_pipeline.state import cached, record

        sw = sweep.load()
        fp = _version("mmcs", storage, sweep, "mlsae")
        hit = cached(storage, "mmcs", None, fp, [storage.table_path("mmcs", None)])
        if hit is not None:
            table = read_table(storage.table_path("mmcs", None))
            return dg.Output(
                table,
                metadata=_meta(table, {**hit, "skipped": True}),
                data_version=dg.DataVersion(fp),
            )
        decoders: dict[str, tuple[dict[str, Any], Any]] = {}
        for model in sw.model_keys:
            for point in sw.points:
                ckpt = storage.sae_dir(model, point.key)
                if not (ckpt / "model.safetensors").exists():
                    context.log.warning("no checkpoint for %s|%s yet; skipped", model, point.key)
                    continue
                cfg = read_checkpoint_config(ckpt)
                part = {
                    "model": model,
                    "expansion_factor": point.expansion_factor,
                    "k": point.k,
                    "layers": layers_label(cfg.get("layers") or [0]),
                }
                decoders[f"{model}|{point.key}"] = (
                    part,
                    read_checkpoint_weights(ckpt)["decoder.weight"],
                )
        if not decoders:
            raise FileNotFoundError(
                f"no trained checkpoints under {storage.path / 'saes'}; materialize mlsae first"
            )
        out = []
        for part, dec in decoders.values():
            out.append(tables.mmcs_table(geometry.mmcs(dec), part, "self"))
            if _is_single(part["layers"]):
                continue
            for other_part, other in decoders.values():
                same = all(other_part[c] == part[c] for c in ("model", "expansion_factor", "k"))
                if same and _is_single(other_part["layers"]):
                    ref = f"layers={other_part['layers']}"
                    out.append(tables.mmcs_table(geometry.mmcs(dec, other), part, ref))
        table = pa.concat_tables(out).sort_by(
            [(c, "ascending") for c in (*PARTITION_COLS, "reference")]
        )
        record(storage, "mmcs", None, fp, {"n_configs": len(decoders)})
        return dg.Output(
            table,
            metadata=_meta(table, {"n_configs": len(decoders), "skipped": False}),
            data_version=dg.DataVersion(fp),
        )

    @dg.asset(
        name="single_layer_comparison",
        group_name=GROUP,
        ins={"test_metrics": dg.AssetIn("test_metrics")},
        io_manager_key="parquet_io_manager",
        kinds={"parquet"},
        code_version=CODE_VERSIONS["single_layer_comparison"],
        automation_condition=eager(),
        description=(
            "The paper's baseline: at each layer l that has a single-layer SAE in the sweep "
            "(same model, expansion factor, k and token budget), the MLSAE's test metrics at l "
            "next to the single-layer SAE's (mlsae_*, single_*, and fvu_ratio = mlsae/single)."
        ),
    )
    def single_layer_comparison(storage: Storage, sweep: SweepResource, test_metrics: Any):
        rows = test_metrics.to_pylist()
        by_cfg: dict[tuple, dict[str, dict[str, Any]]] = {}
        for r in rows:
            by_cfg.setdefault(tuple(r[c] for c in PARTITION_COLS), {})[r["layer"]] = r
        out = []
        for key, layer_rows in sorted(by_cfg.items()):
            if _is_single(key[3]):
                continue
            for skey, srows in sorted(by_cfg.items()):
                if skey[:3] != key[:3] or not _is_single(skey[3]) or skey[3] not in layer_rows:
                    continue
                m, s = layer_rows[skey[3]], srows[skey[3]]
                row: dict[str, Any] = dict(zip(PARTITION_COLS, key, strict=True))
                row["layer"] = int(skey[3])
                for metric in COMPARE_METRICS:
                    row[f"mlsae_{metric}"] = m[metric]
                    row[f"single_{metric}"] = s[metric]
                row["fvu_ratio"] = m["fvu"] / s["fvu"] if s["fvu"] else math.nan
                out.append(row)
        schema = pa.schema(
            [
                ("model", pa.string()),
                ("expansion_factor", pa.int64()),
                ("k", pa.int64()),
                ("layers", pa.string()),
                ("layer", pa.int32()),
                *[
                    (f"{who}_{m}", pa.float64())
                    for m in COMPARE_METRICS
                    for who in ("mlsae", "single")
                ],
                ("fvu_ratio", pa.float64()),
            ]
        )
        table = pa.Table.from_pylist(out, schema=schema)
        fp = _version("single_layer_comparison", storage, sweep, "evaluation")
        return dg.Output(table, metadata=_meta(table), data_version=dg.DataVersion(fp))

    @dg.asset(
        name="results_db",
        group_name=GROUP,
        deps=list(TABLE_ASSETS),
        kinds={"duckdb"},
        code_version=CODE_VERSIONS["results_db"],
        automation_condition=eager(),
        description=(
            "$MLSAE_DATA_DIR/results.duckdb: one view per table asset (named as the asset) "
            "over its Parquet files (a glob for partitioned ones), plus prompt_heatmap and "
            "training_history. Built in a temporary file and renamed into place. Query it "
            'with `mlsae query "SQL"`.'
        ),
    )
    def results_db(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline.state import cached, fingerprint, record

        sw = sweep.load()
        fp = fingerprint(
            CODE_VERSIONS["results_db"],
            view_sources(storage),
            _all_fps(storage, sw, "evaluation"),
            _all_fps(storage, sw, "mlsae"),
            [upstream_fp_model(storage, m) for m in sw.model_keys],
        )
        hit = cached(storage, "results_db", None, fp, [storage.results_db])
        skipped = hit is not None
        if hit is None:
            hit = {k: list(v) for k, v in build_results_db(storage).items()}
            record(storage, "results_db", None, fp, hit)
        views = {k: tuple(v) for k, v in hit.items()}
        lines = ["| view | rows | source |", "|---|---|---|"]
        lines += [f"| {name} | {n} | `{src}` |" for name, (n, src) in views.items()]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(storage.results_db)),
                "views": dg.MetadataValue.md("\n".join(lines)),
                "n_views": len(views),
                "skipped": skipped,
            },
            data_version=dg.DataVersion(fp),
        )

    return [test_summary, dists_layer_std, mmcs, single_layer_comparison, results_db]


def upstream_fp_model(storage: Storage, model: str) -> Any:
    from mlsae_pipeline.state import upstream_fp

    return upstream_fp(storage, "resid_cos_sim", model)


def view_sources(storage: Storage) -> dict[str, str]:
    """view name -> Parquet path or glob (absolute) for every table that has files."""
    out: dict[str, str] = {}
    for name, partitioned in TABLE_ASSETS.items():
        if partitioned:
            folder = storage.path / "tables" / name
            if any(folder.glob("*.parquet")):
                out[name] = str(folder / "*.parquet")
        elif storage.table_path(name, None).exists():
            out[name] = str(storage.table_path(name, None))
    for name, pattern in EXTRA_VIEWS.items():
        if any(storage.path.glob(pattern)):
            out[name] = str(storage.path / pattern)
    return out


def build_results_db(storage: Storage) -> dict[str, tuple[int, str]]:
    """Write results.duckdb atomically: build in a temporary file, then rename into place."""
    import duckdb

    sources = view_sources(storage)
    target = storage.results_db
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".results.", suffix=".duckdb", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # duckdb wants to create the file itself
    counts: dict[str, tuple[int, str]] = {}
    try:
        con = duckdb.connect(str(tmp))
        try:
            for name, src in sources.items():
                quoted = src.replace("'", "''")
                extra = ", filename = true" if name == "training_history" else ""
                con.execute(
                    f'CREATE VIEW "{name}" AS SELECT * FROM '
                    f"read_parquet('{quoted}', union_by_name = true{extra})"
                )
                counts[name] = (
                    int(con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]),
                    src,
                )
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
    finally:
        for p in (tmp, tmp.with_name(tmp.name + ".wal")):
            if p.exists():
                p.unlink()
    return counts


def build_summary_checks() -> list[Any]:
    from mlsae_pipeline import checks

    @dg.asset_check(asset="test_summary", name="no_nan", description="No NaN in average metrics")
    def test_summary_no_nan(storage: Storage) -> dg.AssetCheckResult:
        from mlsae_pipeline.io import read_table

        table = read_table(storage.table_path("test_summary", None))
        return checks.no_nan(table, list(checks.RECON_COLUMNS)).result("test_summary")

    @dg.asset_check(
        asset="test_summary",
        name="fvu_in_bounds",
        description="Every config's average FVU within the sweep's checks: bounds",
    )
    def test_summary_fvu(storage: Storage, sweep: SweepResource) -> dg.AssetCheckResult:
        from mlsae_pipeline.io import read_table

        table = read_table(storage.table_path("test_summary", None))
        return checks.fvu_in_bounds(table, sweep.load().checks).result("test_summary")

    @dg.asset_check(asset="mmcs", name="no_nan", description="No NaN MMCS statistics")
    def mmcs_no_nan(storage: Storage) -> dg.AssetCheckResult:
        from mlsae_pipeline.io import read_table

        table = read_table(storage.table_path("mmcs", None))
        return checks.no_nan(table, ["mean"]).result("mmcs")

    @dg.asset_check(
        asset="dists_layer_std", name="no_nan", description="No NaN mean layer_std per config"
    )
    def dists_no_nan(storage: Storage) -> dg.AssetCheckResult:
        from mlsae_pipeline.io import read_table

        table = read_table(storage.table_path("dists_layer_std", None))
        return checks.no_nan(table, ["mean", "mean_rel"]).result("dists_layer_std")

    return [test_summary_no_nan, test_summary_fvu, mmcs_no_nan, dists_no_nan]
