"""`mlsae query "SQL"`: DuckDB over the results file (one view per table), printed as text."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from mlsae_core.layout import StorageLayout


def connect(db: str | os.PathLike[str] | None = None, read_only: bool = True):
    """A DuckDB connection to results.duckdb (default: the storage root's) whose relative
    view paths resolve against the directory holding it: the views name their Parquet files
    relative to the storage root, so a moved or copied root answers the same queries."""
    path = Path(db) if db else StorageLayout.from_env().results_db
    if read_only and not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `mlsae sweep` (or materialize results_db) first"
        )
    root = str(path.resolve().parent)
    return duckdb.connect(str(path), read_only=read_only, config={"file_search_path": root})


def run_query(sql: str, db: str | Path | None = None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `sql` over results.duckdb, opened read-only."""
    con = connect(db)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description or []]
        return columns, cur.fetchall()
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from exc
    finally:
        con.close()
