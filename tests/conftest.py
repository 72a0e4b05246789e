"""Test-session setup shared by every test module."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (mlsae_core.triton_sparse) run under Triton's CPU
# interpreter, so their tests check the same kernel code the GPU compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@contextlib.contextmanager
def storage_env(data: Path, home: Path) -> Iterator[None]:
    """MLSAE_DATA_DIR and DAGSTER_HOME pointed at a test's storage for a module-scoped fixture
    (function-scoped tests use monkeypatch); restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLSAE_DATA_DIR", str(data))
        mp.setenv("DAGSTER_HOME", str(home))
        yield
