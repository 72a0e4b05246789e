"""Table assets' storage: `pyarrow.Table` <-> Parquet where `mlsae_core.layout` says, on
Dagster's `UPathIOManager`; and the DuckDB views over those same files.

A table asset's file is named after the asset, so the pipeline and `mlsae analyse` write the
same files: config-partitioned tables go into their run directory
(`saes/<model>/<sae>/<asset>.parquet`), model-partitioned ones to
`tables/<asset>/<model>.parquet`, unpartitioned (cross-config) ones to `tables/<asset>.parquet`.
Every row carries its partition values as columns, so one `read_parquet` glob concatenates
them: the views of `results.duckdb` (`build_results_db`, from the same paths). Writes are
atomic and recorded in the directory's manifest (`atomic.write_parquet`); every read is
verified (`atomic.read_parquet`): a corrupt file is refused naming it (`mlsae sweep` rebuilds
it), never silently skipped. An unpartitioned asset reading a partitioned table gets the
partitions that exist, concatenated (missing ones are logged and skipped).
"""

import glob
import os
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.layout import RUN_TABLES, StorageLayout
from mlsae_pipeline import ui
from mlsae_pipeline.partitions import split_config_key
from mlsae_pipeline.resources import Storage


def table_metadata(table: Any) -> dict[str, Any]:
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in table.schema]
    )
    return {
        "dagster/row_count": table.num_rows,
        "dagster/column_schema": schema,
        "preview": ui.md(ui.table_md(table)),
    }


def table_path(layout: StorageLayout, asset: str, partition: str | None) -> Path:
    """Where table asset `asset` of `partition` lives (config keys are 'model|sae'; model
    keys are slugs, which never hold a '|')."""
    if partition is None:
        return layout.table(asset)
    if "|" in str(partition):
        return layout.run(*split_config_key(partition)).table(asset)
    return layout.model_table(asset, str(partition))


class TableIOManager(dg.UPathIOManager):
    """`pyarrow.Table` outputs as Parquet under a storage root (`table_path`)."""

    def __init__(self, layout: StorageLayout) -> None:
        from upath import UPath

        super().__init__(base_path=UPath(layout.root))
        self.layout = layout

    def get_asset_relative_path(self, context: Any) -> Any:
        return table_path(self.layout, context.asset_key.path[-1], None).relative_to(
            self.layout.root
        )

    def get_path_for_partition(self, context: Any, path: Any, partition: str) -> Any:
        """`partition` as the base formats it: 'model' or 'model/sae' (dimensions by name)."""
        from upath import UPath

        model, _, sae = partition.partition("/")
        key = f"{model}|{sae}" if sae else model
        return UPath(table_path(self.layout, context.asset_key.path[-1], key))

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: Any) -> None:
        import pyarrow as pa

        if obj is None:
            return
        if not isinstance(obj, pa.Table):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; the "
                "Parquet IO manager stores pyarrow.Table outputs only"
            )
        atomic.write_parquet(Path(path), obj)

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, Any]:
        return {} if obj is None else table_metadata(obj)

    def load_from_path(self, context: dg.InputContext, path: Any) -> Any:
        asset = context.asset_key.to_user_string()
        if not Path(path).exists():  # FileNotFoundError: the base skips a missing partition
            raise FileNotFoundError(
                f"{asset} has no materialized Parquet at {path}; materialize it first "
                "(e.g. `mlsae sweep`)"
            )
        try:
            return atomic.read_parquet(Path(path))
        except atomic.CorruptFileError as exc:
            raise atomic.CorruptFileError(
                exc.path,
                f"{asset}: {exc}; run `mlsae sweep` again (it rebuilds corrupt tables) or "
                f"re-materialize {asset}",
            ) from exc

    def load_input(self, context: dg.InputContext) -> Any:
        """One table; for several partitions, those that exist, concatenated."""
        import pyarrow as pa

        loaded = super().load_input(context)
        if not isinstance(loaded, dict):
            return loaded  # as written, schema metadata included (latent_layer_dists)
        if not loaded:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no materialized partition yet; "
                "materialize it first (e.g. `mlsae sweep`)"
            )
        tables = [loaded[key] for key in sorted(loaded)]
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables, promote_options="default")


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """The `TableIOManager` of `storage`'s root."""

    storage: Storage

    def create_io_manager(self, context: Any) -> TableIOManager:
        return TableIOManager(self.storage.layout)


# Missing partitions of a partitioned table are skipped (logged), not an error, for the
# unpartitioned assets that read every config: `AssetIn(..., metadata=ALLOW_MISSING)`.
ALLOW_MISSING = {"allow_missing_partitions": True}
MODEL_TABLES = ("resid_cos_sim", "residual_probes")
SUMMARY_TABLES = ("test_summary", "dists_layer_std", "mmcs", "single_layer_comparison", "claims")
# Every table asset, each one DuckDB view of results_db (plus training_history).
TABLE_ASSETS = (*RUN_TABLES, *MODEL_TABLES, *SUMMARY_TABLES)


def view_sources(layout: StorageLayout) -> dict[str, list[str]]:
    """view name -> Parquet paths or globs, relative to the storage root, for every table that
    has files (relative, so a moved or copied root keeps answering: see `query.connect`)."""
    sources = {name: layout.run_table_glob(name) for name in RUN_TABLES}
    sources.update({name: layout.model_table_glob(name) for name in MODEL_TABLES})
    sources.update({name: str(layout.table(name)) for name in SUMMARY_TABLES})
    sources["training_history"] = str(layout.run("*", "*").history)
    found = {n: [os.path.relpath(src, layout.root)] for n, src in sources.items() if glob.glob(src)}
    if "residual_probes" in found:  # one view of probes: each config's, and the ceiling's once
        found["probes"] = [*found.get("probes", []), *found["residual_probes"]]
    return found


def build_results_db(layout: StorageLayout) -> dict[str, tuple[int, str]]:
    """Write results.duckdb atomically (built in a temporary file, renamed into place) and
    record it in its directory's manifest: one view per table; returns {view: (rows, source)}."""
    from mlsae_core.query import connect

    counts: dict[str, tuple[int, str]] = {}
    with atomic.atomic_path(layout.results_db) as tmp:
        tmp.unlink()  # duckdb wants to create the file itself
        with connect(tmp, read_only=False) as con:
            for name, src in view_sources(layout).items():
                files = ", ".join("'" + s.replace("'", "''") + "'" for s in src)
                extra = ", filename = true" if name == "training_history" else ""
                con.execute(
                    f'CREATE VIEW "{name}" AS SELECT * FROM '
                    f"read_parquet([{files}], union_by_name = true{extra})"
                )
                (rows,) = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()
                counts[name] = (int(rows), ", ".join(src))
            con.execute("CHECKPOINT")
    atomic.record(layout.results_db.parent, [layout.results_db.name])
    return counts
