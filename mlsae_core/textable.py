"""The one table printer: rows -> aligned text for the terminal, or Markdown for the Dagster UI
and the report; and the one way a figure goes inline (a PNG as a data URI)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def format_value(v: Any, list_items: int = 6) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        inner = ", ".join(format_value(x, list_items) for x in v[:list_items])
        return "[" + inner + (", …]" if len(v) > list_items else "]")
    return "NULL" if v is None else str(v)


def format_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    max_rows: int = 50,
    markdown: bool = False,
    max_width: int = 40,
    total: int | None = None,
) -> str:
    """Aligned text (or a Markdown table) of the first `max_rows` rows, with a 'more' line;
    `total`: how many rows there are when `rows` is only the first of them."""
    cells = [[format_value(v) for v in r] for r in rows[:max_rows]]
    total = len(rows) if total is None else total
    more = f"… {total - max_rows} more rows" if total > max_rows else None
    if markdown:

        def md(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "\\n")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(md(c) for c in r) + " |" for r in cells]
        return "\n".join(lines + ([f"\n{more}"] if more else []))
    widths = [
        min(max_width, max([len(c), *(len(r[i]) for r in cells)])) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c[:w].rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v[:w].rjust(w) for v, w in zip(r, widths, strict=True)))
    return "\n".join(lines + ([more] if more else []))


def png_data_uri(path: str | Path) -> str:
    """A PNG as a data URI, so a page or the Dagster UI shows it without a file server."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def format_records(records: Sequence[Mapping[str, Any]], columns: Sequence[str], **kw: Any) -> str:
    """format_table over dict rows, keeping `columns` in order."""
    return format_table(columns, [[r.get(c) for c in columns] for r in records], **kw)
