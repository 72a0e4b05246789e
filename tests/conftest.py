"""Test-session setup shared by every test module."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton kernels (mlsae_core.triton_sparse) run under Triton's CPU
# interpreter, so their tests check the same kernel code the GPU compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_sweep_text(tmp_path: Path, name: str, text: str) -> tuple[Any, Path]:
    """Write sweep `text` as `<name>.yaml`, the smoke inputs into a fresh storage root, and
    materialize the whole sweep through Dagster; (the Sweep, the root). Fails on any failed run."""
    import dagster as dg

    from mlsae_pipeline.commands import run_sweep
    from mlsae_pipeline.sweep import load_sweep
    from tests.tiny import write_smoke_inputs

    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    sw = load_sweep(path)
    data, home = write_smoke_inputs(tmp_path / "data"), tmp_path / "home"
    home.mkdir()
    with storage_env(data, home):
        rows = run_sweep(sw, data, instance=dg.DagsterInstance.get(), report=lambda s: None)
    assert all(r["success"] for r in rows), rows
    return sw, data


@contextlib.contextmanager
def storage_env(data: Path, home: Path) -> Iterator[None]:
    """MLSAE_DATA_DIR and DAGSTER_HOME pointed at a test's storage for a module-scoped fixture
    (function-scoped tests use monkeypatch); restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLSAE_DATA_DIR", str(data))
        mp.setenv("DAGSTER_HOME", str(home))
        yield
