"""Skip unchanged work: every heavy asset records a fingerprint of what it computed.

fingerprint = hash(asset code version, the settings it used, its upstream fingerprints).
When a materialization finds a record with the same fingerprint and its outputs on disk,
it reports the recorded metadata (plus `skipped: true`) instead of recomputing. The
fingerprint is also the asset's Dagster data version, so downstream staleness follows
content, not clock time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlsae_core import atomic
from mlsae_pipeline.resources import Storage


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(storage: Storage, asset: str, partition: str | None) -> dict[str, Any] | None:
    path = storage.state_path(asset, partition)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def upstream_fp(storage: Storage, asset: str, partition: str | None) -> str | None:
    rec = read_record(storage, asset, partition)
    return rec["fingerprint"] if rec else None


def cached(
    storage: Storage, asset: str, partition: str | None, fp: str, outputs: Iterable[Path]
) -> dict[str, Any] | None:
    """The recorded metadata when `fp` matches and every output exists, else None."""
    rec = read_record(storage, asset, partition)
    if rec is None or rec.get("fingerprint") != fp:
        return None
    if not all(Path(p).exists() for p in outputs):
        return None
    return rec.get("metadata", {})


def record(
    storage: Storage, asset: str, partition: str | None, fp: str, metadata: dict[str, Any]
) -> None:
    atomic.write_json(
        storage.state_path(asset, partition), {"fingerprint": fp, "metadata": metadata}
    )
