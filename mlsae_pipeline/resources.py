"""Resources that swap by environment: the storage root, the sweep file, the executor.

`MLSAE_DATA_DIR` picks the storage root (default `data/`), `MLSAE_SWEEP` the sweep file,
`MLSAE_EXECUTOR` the executor (`multiprocess` default, `in_process`, or `k8s` when
dagster-k8s is installed). Where anything lives under the root is `mlsae_core.layout`'s
business (the same layout `mlsae analyse` and the explorer use); `Storage` only carries the
root through Dagster's resource system.
"""

import os
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core.layout import StorageLayout, data_root
from mlsae_pipeline.sweep import Sweep, load_sweep


def default_data_dir() -> str:
    return str(data_root())


class Storage(dg.ConfigurableResource):
    """The storage root (`MLSAE_DATA_DIR`); every path under it comes from `layout`."""

    root: str

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.root))


class SweepResource(dg.ConfigurableResource):
    """The sweep file (`MLSAE_SWEEP`), re-read and validated when a run starts."""

    path: str

    def load(self) -> Sweep:
        return load_sweep(self.path)


def executor_from_env() -> Any:
    """`MLSAE_EXECUTOR`: multiprocess (default), in_process, or k8s (needs dagster-k8s); a
    missing dagster-k8s or an unknown name warns and uses multiprocess."""
    kind = os.environ.get("MLSAE_EXECUTOR", "multiprocess").strip().lower()
    if kind == "in_process":
        return dg.in_process_executor
    problem = f"MLSAE_EXECUTOR={kind!r} is unknown (multiprocess, in_process, k8s)"
    if kind == "k8s":
        try:
            from dagster_k8s import k8s_job_executor  # type: ignore[import-not-found]

            return k8s_job_executor
        except ImportError:
            problem = "MLSAE_EXECUTOR=k8s but dagster-k8s is not installed (pip install .[k8s])"
    if kind != "multiprocess":
        warnings.warn(f"{problem}; using the multiprocess executor", stacklevel=2)
    return dg.multiprocess_executor
