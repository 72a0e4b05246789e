"""Skip unchanged work, written once: every asset runs its computation through `memo`.

fingerprint = hash(the asset's code version, the inputs it names: settings and upstream
fingerprints). When the last record under `state/` has the same fingerprint and the outputs
it names are on disk and intact, the recorded metadata is replayed with `skipped: true`
instead of recomputing. The fingerprint is also the asset's Dagster data version, so
staleness in the UI follows content, not clock time.

Intact: an up-to-date fingerprint must never hide a corrupt file, so the record also holds
the sha256 of every output the computation wrote (and of its `<name>.json` sidecar, e.g. a
token-chunks file's); Parquet tables carry their own (`atomic.write_parquet`), because the
IO manager writes them after the record. A missing, truncated or modified output is logged
and recomputed, as if it had never been written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.layout import StorageLayout
from mlsae_pipeline.assets import CODE_VERSIONS

logger = logging.getLogger(__name__)


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
    rebuilt: str | None = None  # why an up-to-date result was recomputed (a corrupt output)

    def _metadata(self, metadata: dict[str, Any] | None, ui: dict[str, Any]) -> dict[str, Any]:
        base = self.metadata if metadata is None else metadata
        extra = {"rebuilt": self.rebuilt} if self.rebuilt else {}
        return {**base, **ui, **extra, "skipped": self.skipped, "fingerprint": self.fingerprint}

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
    CODE_VERSIONS[asset] they make the fingerprint); `outputs`: files that must exist, intact,
    for a skip; `load()` rebuilds the value of a skipped step (e.g. reads its table back).
    """
    outputs = [Path(p) for p in outputs]
    fp = fingerprint(CODE_VERSIONS[asset], *inputs)
    rec = read_record(layout, asset, partition)
    problem = None
    if rec is not None and rec.get("fingerprint") == fp:
        problem = _damaged(layout, rec, outputs)
        if problem is None:
            try:
                value = load() if load is not None else None
            except atomic.CorruptFileError as exc:  # changed since it was checked
                problem = str(exc)
            else:
                return Memo(fp, True, rec.get("metadata", {}), value)
        where = asset if partition is None else f"{asset} {partition}"
        logger.warning("%s is up to date but %s: recomputing it", where, problem)
    value, metadata = compute()
    metadata = _plain(metadata)
    atomic.write_json(
        layout.state_path(asset, partition),
        {"fingerprint": fp, "metadata": metadata, "outputs": _checksums(layout, outputs)},
    )
    return Memo(fp, False, metadata, value, rebuilt=problem)


def _key(layout: StorageLayout, path: Path) -> str:
    """A file's name in the record: relative to the storage root, so the root can move."""
    try:
        return path.relative_to(layout.root).as_posix()
    except ValueError:
        return str(path)


def _sidecar(path: Path) -> Path:
    """Where an output's JSON sidecar would be (TokenChunks.save writes `<name>.json`)."""
    return path.with_name(path.name + ".json")


def _checksums(layout: StorageLayout, outputs: list[Path]) -> dict[str, dict[str, Any]]:
    """size and sha256 of the outputs compute() wrote; Parquet tables check themselves (the IO
    manager writes them after this record, so what is on disk now may be the old file)."""
    out = {}
    for path in outputs:
        if path.suffix == ".parquet" or not path.is_file():
            continue
        for f in (path, _sidecar(path)):
            if f.is_file():
                out[_key(layout, f)] = {"bytes": f.stat().st_size, "sha256": atomic.sha256_file(f)}
    return out


def _damaged(layout: StorageLayout, rec: dict, outputs: list[Path]) -> str | None:
    """Why the recorded outputs cannot be re-used (missing, truncated, modified), or None.

    Records written before checksums (no "outputs") only need the files to exist (and tables
    their own checksum: a table from before checksums is recomputed once)."""
    recorded = rec.get("outputs")
    for path in outputs:
        if not path.exists():
            return f"{path} is missing"
        if path.suffix == ".parquet":
            try:
                atomic.verify(path.parent, [path.name])
            except atomic.CorruptFileError as exc:
                return str(exc)
            continue
        if recorded is None:
            continue
        for f in (path, _sidecar(path)):
            want = recorded.get(_key(layout, f))
            if want is None:
                if f == path or f.is_file():
                    return f"{f} has no recorded checksum (written by something else?)"
                continue
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != want["bytes"] or atomic.sha256_file(f) != want["sha256"]:
                return (
                    f"{f} does not match the checksum recorded when it was written "
                    "(truncated or modified)"
                )
    return None
