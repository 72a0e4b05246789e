"""An IO manager for table assets: `pyarrow.Table` <-> Parquet, where `mlsae_core.layout` says.

A table asset's file is named after the asset, so the pipeline and `mlsae analyse` write the
same files: config-partitioned tables go into their run directory
(`saes/<model>/<sae>/<asset>.parquet`), model-partitioned ones to
`tables/<asset>/<model>.parquet`, unpartitioned (cross-config) ones to `tables/<asset>.parquet`.
Every row carries its partition values as columns, so one `read_parquet` glob concatenates
them (the DuckDB views of `results_db`). Writes are atomic. Loading a partitioned input for
an unpartitioned asset concatenates the partitions that exist (missing ones are logged and
skipped). Every file carries a sha256 of itself (`atomic.write_parquet`) and is checked when
read back: a corrupt one is refused naming the file (`mlsae sweep` rebuilds it
on the next `mlsae sweep`), never silently skipped.
"""

import logging
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.layout import StorageLayout
from mlsae_pipeline.partitions import split_config_key
from mlsae_pipeline.resources import Storage

logger = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        text = " ".join(_fmt(x) for x in v[:9])
        return text + (" …" if len(v) > 9 else "")
    return str(v).replace("|", "\\|").replace("\n", "\\n")


def md_table(table: Any, max_rows: int = 12, columns: list[str] | None = None) -> str:
    """A Markdown preview of a pyarrow table (first rows) for the Dagster UI."""
    cols = columns or table.column_names
    rows = table.select(cols).slice(0, max_rows).to_pylist()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    if table.num_rows > max_rows:
        lines.append(f"\n… {table.num_rows - max_rows} more rows")
    return "\n".join(lines)


def table_metadata(table: Any, path: Path) -> dict[str, Any]:
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in table.schema]
    )
    return {
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": table.num_rows,
        "dagster/column_schema": schema,
        "preview": dg.MetadataValue.md(md_table(table)),
    }


def table_path(layout: StorageLayout, asset: str, partition: str | None) -> Path:
    """Where table asset `asset` of `partition` lives (config keys are 'model|sae'; model
    keys are slugs, which never hold a '|')."""
    if partition is None:
        return layout.table(asset)
    if "|" in str(partition):
        return layout.run(*split_config_key(partition)).table(asset)
    return layout.model_table(asset, str(partition))


def read_table(path: Path) -> Any:
    """The table at `path`, checked against its checksum (`atomic.CorruptFileError` if not)."""
    return atomic.read_parquet(path)


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores `pyarrow.Table` outputs as Parquet under `storage`'s root (atomic writes)."""

    storage: Storage

    def _path(self, context: dg.OutputContext | dg.InputContext, partition: str | None) -> Path:
        return table_path(self.storage.layout, context.asset_key.path[-1], partition)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        import pyarrow as pa

        if not isinstance(obj, pa.Table):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; the "
                "Parquet IO manager stores pyarrow.Table outputs only"
            )
        partition = context.partition_key if context.has_partition_key else None
        path = self._path(context, partition)
        atomic.write_parquet(path, obj)
        context.add_output_metadata(table_metadata(obj, path))

    def load_input(self, context: dg.InputContext) -> Any:
        import pyarrow as pa

        if context.has_asset_partitions:
            keys = sorted(context.asset_partition_keys)
            paths = [self._path(context, key) for key in keys]
        else:
            paths = [self._path(context, None)]
        found = [p for p in paths if p.exists()]
        missing = [p for p in paths if not p.exists()]
        if missing:
            logger.warning(
                "%s: %d of %d partitions not materialized yet (skipped): %s",
                context.asset_key.to_user_string(),
                len(missing),
                len(paths),
                ", ".join(p.stem for p in missing[:5]),
            )
        if not found:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no materialized Parquet under "
                f"{paths[0].parent}; materialize it first (e.g. `mlsae sweep`)"
            )
        try:
            tables = [read_table(p) for p in found]
        except atomic.CorruptFileError as exc:
            asset = context.asset_key.to_user_string()
            raise atomic.CorruptFileError(
                exc.path,
                f"{asset}: {exc}; run `mlsae sweep` again (it rebuilds corrupt tables) or "
                f"re-materialize {asset}",
            ) from exc
        if len(tables) == 1:
            return tables[0]  # as written, schema metadata included (latent_layer_dists)
        return pa.concat_tables(tables, promote_options="default")
