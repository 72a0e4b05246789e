"""Skip unchanged work, written once: every asset runs its computation through `memo`.

fingerprint = hash(the asset's code version, the inputs it names: settings and upstream
fingerprints). When the last record under `state/` has the same fingerprint and the outputs
it names are on disk, the recorded metadata is replayed with `skipped: true` instead of
recomputing. The fingerprint is also the asset's Dagster data version, so staleness in the
UI follows content, not clock time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.layout import StorageLayout
from mlsae_pipeline.assets import CODE_VERSIONS


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(layout: StorageLayout, asset: str, partition: str | None) -> dict | None:
    path = layout.state_path(asset, partition)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def upstream(layout: StorageLayout, asset: str, partition: str | None) -> str | None:
    """The fingerprint `asset` last recorded for `partition` (None: not materialized)."""
    rec = read_record(layout, asset, partition)
    return rec["fingerprint"] if rec else None


def config_upstreams(layout: StorageLayout, sweep: Any, asset: str) -> list[str | None]:
    """`upstream` of every config partition of the sweep (the summary assets' inputs)."""
    from mlsae_pipeline.partitions import config_key

    return [
        upstream(layout, asset, config_key(m, p.key))
        for m in sweep.model_keys
        for p in sweep.points
    ]


def _plain(value: Any) -> Any:
    """JSON-ready metadata: NaN -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item"):
        return _plain(value.item())
    return str(value)


@dataclass(frozen=True)
class Memo:
    """What a memoized step reports: computed now, or replayed from its record."""

    fingerprint: str
    skipped: bool
    metadata: dict[str, Any] = field(default_factory=dict)  # recorded (JSON) metadata
    value: Any = None  # compute()'s value, or load()'s when skipped

    def _metadata(self, metadata: dict[str, Any] | None, ui: dict[str, Any]) -> dict[str, Any]:
        base = self.metadata if metadata is None else metadata
        return {**base, **ui, "skipped": self.skipped, "fingerprint": self.fingerprint}

    @property
    def data_version(self) -> dg.DataVersion:
        return dg.DataVersion(self.fingerprint)

    def result(self, **ui: Any) -> dg.MaterializeResult:
        """For assets without an IO manager; `ui` adds display-only metadata."""
        return dg.MaterializeResult(
            metadata=self._metadata(None, ui), data_version=self.data_version
        )

    def output(
        self,
        value: Any = None,
        output_name: str = "result",
        metadata: dict[str, Any] | None = None,
        **ui: Any,
    ) -> dg.Output:
        """For IO-managed assets: `value` (default: this memo's) goes to the IO manager."""
        return dg.Output(
            self.value if value is None else value,
            output_name=output_name,
            metadata=self._metadata(metadata, ui),
            data_version=self.data_version,
        )


def memo(
    layout: StorageLayout,
    asset: str,
    partition: str | None,
    inputs: Sequence[Any],
    outputs: Iterable[Path],
    compute: Callable[[], tuple[Any, dict[str, Any]]],
    load: Callable[[], Any] | None = None,
) -> Memo:
    """Run `compute() -> (value, metadata)` unless nothing it depends on changed.

    `inputs`: the settings and upstream fingerprints the result depends on (with
    CODE_VERSIONS[asset] they make the fingerprint); `outputs`: files that must exist for a
    skip; `load()` rebuilds the value of a skipped step (e.g. reads its table back).
    """
    fp = fingerprint(CODE_VERSIONS[asset], *inputs)
    rec = read_record(layout, asset, partition)
    if rec is not None and rec.get("fingerprint") == fp and all(Path(p).exists() for p in outputs):
        value = load() if load is not None else None
        return Memo(fp, True, rec.get("metadata", {}), value)
    value, metadata = compute()
    metadata = _plain(metadata)
    atomic.write_json(
        layout.state_path(asset, partition), {"fingerprint": fp, "metadata": metadata}
    )
    return Memo(fp, False, metadata, value)
