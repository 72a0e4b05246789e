"""`mlsae query "SQL"`: DuckDB over the results file (one view per table), printed as text."""

from __future__ import annotations

from pathlib import Path

import duckdb

from mlsae_core.layout import StorageLayout


def run_query(sql: str, db: str | Path | None = None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `sql` over results.duckdb, opened read-only."""
    path = Path(db) if db else StorageLayout.from_env().results_db
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
