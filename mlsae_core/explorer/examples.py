"""The max-activating examples of one MLSAE, indexed by (latent, layer), in memory.

The table is the `max_examples` table of docs/tables.md, found where every writer puts it:
the run directory's `max_examples.parquet` (`RunLayout.table`), whether `mlsae analyse`,
`mlsae examples` or the pipeline wrote it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlsae_core import atomic
from mlsae_core.explorer.schemas import Example
from mlsae_core.explorer.wire import finite
from mlsae_core.layout import RunLayout

logger = logging.getLogger(__name__)

NO_EXAMPLES_HINT = "no examples computed; run mlsae examples --repo_id {repo}"


class ExamplesStore:
    """The `max_examples` table sorted by (latent, layer, rank), so a lookup is a binary search."""

    # the columns the API answers with (`schemas.Example`): required, then when present
    REQUIRED = tuple(n for n, f in Example.model_fields.items() if f.is_required())
    OPTIONAL = tuple(n for n, f in Example.model_fields.items() if not f.is_required())

    def __init__(self, table: pa.Table, source: str = "table") -> None:
        missing = [c for c in self.REQUIRED if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{source} lacks columns {missing}: not a max_examples table (docs/tables.md)"
            )
        keep = [*self.REQUIRED, *(c for c in self.OPTIONAL if c in table.column_names)]
        table = table.select(keep)
        latent = table["latent"].to_numpy().astype(np.int64)
        layer = table["layer"].to_numpy().astype(np.int64)
        rank = table["rank"].to_numpy().astype(np.int64)
        order = np.lexsort((rank, layer, latent))  # by latent, then layer, then rank
        self.source = source
        self.table = table.take(order)
        self._stride = int(layer.max()) + 1 if len(layer) else 1
        self._keys = latent[order] * self._stride + layer[order]  # sorted
        self._act = self.table["activation"].to_numpy().astype(np.float64)
        self.n_rows = int(len(self.table))

    @classmethod
    def from_parquet(cls, path: str | Path) -> ExamplesStore:
        """The table at `path`, verified against its directory's manifest (`atomic.verify`,
        streamed) before only the needed columns are read."""
        path = Path(path)
        atomic.verify(path.parent, [path.name])
        schema = pq.read_schema(path)
        cols = [c for c in (*cls.REQUIRED, *cls.OPTIONAL) if c in schema.names]
        return cls(pq.read_table(path, columns=cols), source=str(path))

    def _span(self, latent: int, layer: int) -> tuple[int, int]:
        if layer >= self._stride or layer < 0:
            return 0, 0
        key = latent * self._stride + layer
        lo = int(np.searchsorted(self._keys, key, side="left"))
        hi = int(np.searchsorted(self._keys, key, side="right"))
        return lo, hi

    def get(self, latent: int, layer: int, limit: int) -> list[dict[str, Any]]:
        """The first `limit` examples by rank, with non-finite activations as null (JSON)."""
        lo, hi = self._span(latent, layer)
        rows = self.table.slice(lo, min(hi - lo, limit)).to_pylist()
        for r in rows:
            r["activation"] = finite(r["activation"])
            r["context_activations"] = [
                None if a is None else finite(a) for a in r["context_activations"]
            ]
        return rows

    def count(self, latent: int, layer: int) -> int:
        lo, hi = self._span(latent, layer)
        return hi - lo

    def max_activation(self, latent: int, layer: int) -> float | None:
        lo, hi = self._span(latent, layer)
        if hi == lo:
            return None
        return float(self._act[lo:hi].max())


def examples_path(directory: Path) -> Path:
    """Where a checkpoint's max_examples table lives: `<run directory>/max_examples.parquet`."""
    return RunLayout(Path(directory)).table("max_examples")


def load_examples(
    directory: Path, repo_id: str, path: Path | None = None
) -> tuple[ExamplesStore | None, str | None]:
    """The examples table (`path`, else the checkpoint's own), or (None, how to make it).

    A missing or unreadable table is not fatal: the rest of the explorer works without it.
    """
    hint = NO_EXAMPLES_HINT.format(repo=repo_id)
    if path is None:
        path = examples_path(directory)
        if not path.is_file():
            return None, hint
    elif not Path(path).is_file():
        return None, f"{path} does not exist; " + hint
    try:
        return ExamplesStore.from_parquet(path), None
    except Exception as exc:  # noqa: BLE001 - a bad table must not stop the explorer
        logger.warning("cannot read %s: %s", path, exc)
        return None, f"{path} could not be read ({type(exc).__name__}: {exc}); " + hint
