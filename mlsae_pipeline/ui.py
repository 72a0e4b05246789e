"""What the Dagster UI shows of an asset: a table preview, figures inline, JSON-ready values."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core.textable import format_table, png_data_uri


def terminal_progress() -> bool:
    """Progress bars on the terminal: `mlsae sweep` turns them on (MLSAE_PROGRESS=1); in the
    UI's runs the event log has the progress lines instead."""
    return os.environ.get("MLSAE_PROGRESS") == "1"


def table_md(table: Any, max_rows: int = 12) -> str:
    """A Markdown preview of a pyarrow table's first rows."""
    rows = [list(r.values()) for r in table.slice(0, max_rows).to_pylist()]
    return format_table(table.column_names, rows, max_rows, markdown=True, total=table.num_rows)


def figures_md(paths: list[Path]) -> str:
    """PNG figures inline, each under its file name."""
    return "\n\n".join(f"![{p.stem}]({png_data_uri(p)})" for p in paths)


def md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)


def files(layout: Any, paths: Any) -> list[str]:
    """The files an asset wrote, relative to the storage root (so a moved root keeps them):
    `mlsae sweep` verifies them against their manifests before it trusts the asset."""
    return [str(Path(p).relative_to(layout.root)) for p in paths]


def plain(value: Any) -> Any:
    """JSON-ready metadata: NaN -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return plain(value.item()) if hasattr(value, "item") else str(value)
