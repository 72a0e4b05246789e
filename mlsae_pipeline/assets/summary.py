"""Group `summary`: tables over every config of the sweep, and the DuckDB results file.

The tables come from `mlsae_core.analysis.summaries` (tables in, tables out), the functions
`mlsae figures test_summary|dists_layer_std|mmcs` call too. These assets are unpartitioned and
read all partitions of their upstream tables (missing ones are skipped), so
`dagster asset materialize --select mmcs` works whenever some checkpoints exist.
"""

from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.textable import format_table
from mlsae_pipeline import checks, ui
from mlsae_pipeline.assets import PARQUET, asset
from mlsae_pipeline.io import ALLOW_MISSING, TABLE_ASSETS, build_results_db
from mlsae_pipeline.resources import Storage, SweepResource

GROUP = "summary"
TEST_METRICS = {"test_metrics": dg.AssetIn("test_metrics", metadata=ALLOW_MISSING)}


def _preview(table: Any) -> dict[str, Any]:
    return {"table": ui.md(ui.table_md(table, max_rows=30))}


@asset(GROUP, {"parquet", "matplotlib"}, ins=TEST_METRICS, io_manager_key=PARQUET)
def test_summary(context: dg.AssetExecutionContext, storage: Storage, test_metrics: Any):
    """One row per config (model, expansion_factor, k, layers) with the test metrics averaged
    over layers (summaries.summarize_test_metrics), plus figures of each metric by k and by
    expansion factor (figures/test_<metric>_by_{k,expansion})."""
    from mlsae_core import figures
    from mlsae_core.analysis import summaries

    table = summaries.summarize_test_metrics(test_metrics)
    try:
        written = figures.summary_figures(
            table, storage.layout.figures_dir, metrics=("fvu", "l0", "dce")
        )
    except ValueError as exc:  # nothing to plot
        context.log.warning("summary figures skipped: %s", exc)
        written = []
    pngs = [p for p in written if p.suffix == ".png"]
    meta = _preview(table)
    if pngs:
        meta["plots"] = ui.md(ui.figures_md(pngs[:2]))
    return dg.Output(table, metadata={**meta, "figures": [str(p) for p in pngs]})


@asset(
    GROUP,
    {"parquet"},
    ins={"dists_summary": dg.AssetIn("dists_summary", metadata=ALLOW_MISSING)},
    io_manager_key=PARQUET,
)
def dists_layer_std(dists_summary: Any):
    """Per config: mean/var/std/sem of each live latent's layer_std (how spread over layers
    latents are), and the same divided by n_layers (*_rel), as the paper's tables: every run's
    dists_summary row (summaries.dists_layer_std)."""
    from mlsae_core.analysis import summaries

    table = summaries.dists_layer_std(dists_summary)
    return dg.Output(table, metadata=_preview(table))


@asset(GROUP, {"parquet", "pytorch"}, deps=["mlsae"], io_manager_key=PARQUET)
def mmcs(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """Mean max cosine similarity of decoder columns, read from every config's checkpoint:
    within each dictionary (reference='self') and between each MLSAE and the single-layer SAEs
    of the same model, expansion factor and k (reference='layers=<l>'); summaries.mmcs."""
    from mlsae_core.analysis import summaries

    layout, sw, found = storage.layout, sweep.load(), []
    for model in sw.model_keys:
        for point in sw.points:
            run = layout.run(model, point.key)
            if run.weights.exists():
                found.append(summaries.run_decoder(run.directory))
            else:
                context.log.warning("no checkpoint for %s|%s yet; skipped", model, point.key)
    if not found:
        raise FileNotFoundError(
            f"no trained checkpoints under {storage.layout.root / 'saes'}; materialize mlsae first"
        )
    table = summaries.mmcs(found)
    return dg.Output(table, metadata={**_preview(table), "n_configs": len(found)})


@asset(GROUP, {"parquet"}, ins=TEST_METRICS, io_manager_key=PARQUET)
def single_layer_comparison(test_metrics: Any):
    """The paper's baseline: at each layer l that has a single-layer SAE in the sweep (same
    model, expansion factor, k and token budget), the MLSAE's test metrics at l next to the
    single-layer SAE's (mlsae_*, single_*, and fvu_ratio = mlsae/single)."""
    from mlsae_core.analysis import summaries

    table = summaries.single_layer_comparison(test_metrics)
    return dg.Output(table, metadata=_preview(table))


def _all(*names: str) -> dict[str, dg.AssetIn]:
    return {n: dg.AssetIn(n, metadata=ALLOW_MISSING) for n in names}


@asset(
    GROUP,
    {"parquet"},
    ins={
        **_all("test_metrics", "layer_variance", "latent_variance"),
        "dists_layer_std": dg.AssetIn(),
    },
    io_manager_key=PARQUET,
)
def claims(test_metrics: Any, dists_layer_std: Any, layer_variance: Any, latent_variance: Any):
    """The paper's three claims at this sweep's budget: per claim the numbers behind it for
    every config (with standard errors or seed spread), its verdict (holds / does not hold /
    cannot tell) and the reason (analysis.claims; rules in docs/method.md §8)."""
    from mlsae_core.analysis import claims as c

    table = c.claims_table(test_metrics, dists_layer_std, layer_variance, latent_variance)
    return dg.Output(table, metadata=_preview(table))


@asset(
    GROUP,
    {"html", "matplotlib"},
    ins={**_all("test_metrics", "layer_variance", "resid_cos_sim"),
         "dists_layer_std": dg.AssetIn(), "claims": dg.AssetIn()},
)  # fmt: skip
def report(
    storage: Storage,
    claims: Any,
    test_metrics: Any,
    dists_layer_std: Any,
    layer_variance: Any,
    resid_cos_sim: Any,
):
    """$MLSAE_DATA_DIR/report/report.html (self-contained, opens offline) and report.md: each
    claim's statistic, how it is computed, its numbers per config, its figure and verdict."""
    from mlsae_core.analysis.claims import verdicts
    from mlsae_core.report import write_report

    tables = {"test_metrics": test_metrics, "dists_layer_std": dists_layer_std,
              "layer_variance": layer_variance, "resid_cos_sim": resid_cos_sim}  # fmt: skip
    out = write_report(tables, storage.layout.report_dir, claims)
    rows = [[c, v, why] for c, (v, why) in sorted(verdicts(claims).items())]
    pngs = [p for ps in out["pngs"].values() for p in ps]
    html = out["paths"]["html"]
    md = "\n\n".join([
        format_table(["claim", "verdict", "reason"], rows, markdown=True),
        ui.table_md(claims, max_rows=40),
        ui.figures_md(pngs[:2]),
        f"[report.html]({html.as_uri()})",
    ])  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "report": ui.md(md),
            "html": dg.MetadataValue.path(str(html)),
            "files": ui.files(storage.layout, [html, html.with_suffix(".md")]),
        }
    )


@asset(GROUP, {"duckdb"}, deps=[*TABLE_ASSETS, "mlsae"])
def results_db(storage: Storage):
    """$MLSAE_DATA_DIR/results.duckdb: one view per table asset (named as the asset) over its
    Parquet files (a glob over the run directories for per-run tables), plus
    training_history. Built in a temporary file and renamed into place. Query it with
    `mlsae query "SQL"`."""
    layout = storage.layout
    views = build_results_db(layout)
    rows = [[name, n, f"`{src}`"] for name, (n, src) in views.items()]
    listing = format_table(["view", "rows", "source"], rows, len(rows), markdown=True)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(layout.results_db)),
            "files": ui.files(layout, [layout.results_db]),
            "views": ui.md(listing),
            "n_views": len(views),
        }
    )


SUMMARY_ASSETS = [
    test_summary, dists_layer_std, mmcs, single_layer_comparison, claims, report, results_db
]  # fmt: skip


# ----- checks on the stored cross-config tables ------------------------------------------------
def _stored(storage: Storage, name: str) -> Any:
    return atomic.read_parquet(storage.layout.table(name))


@dg.asset_check(asset="test_summary", name="no_nan", description="No NaN in average metrics")
def test_summary_no_nan(storage: Storage) -> dg.AssetCheckResult:
    table = _stored(storage, "test_summary")
    return checks.no_nan(table, list(checks.RECON_COLUMNS)).result("test_summary")


@dg.asset_check(
    asset="test_summary",
    name="fvu_in_bounds",
    description="Every config's average FVU within the sweep's checks: bounds",
)
def test_summary_fvu(storage: Storage, sweep: SweepResource) -> dg.AssetCheckResult:
    table = _stored(storage, "test_summary")
    return checks.fvu_in_bounds(table, sweep.load().checks).result("test_summary")


@dg.asset_check(asset="mmcs", name="no_nan", description="No NaN MMCS statistics")
def mmcs_no_nan(storage: Storage) -> dg.AssetCheckResult:
    return checks.no_nan(_stored(storage, "mmcs"), ["mean"]).result("mmcs")


@dg.asset_check(
    asset="dists_layer_std", name="no_nan", description="No NaN mean layer_std per config"
)
def dists_no_nan(storage: Storage) -> dg.AssetCheckResult:
    table = _stored(storage, "dists_layer_std")
    return checks.no_nan(table, ["mean", "mean_rel"]).result("dists_layer_std")


SUMMARY_CHECKS = [test_summary_no_nan, test_summary_fvu, mmcs_no_nan, dists_no_nan]
