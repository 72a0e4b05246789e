"""Resources that swap by environment: the storage root, the sweep file, the executor.

`MLSAE_DATA_DIR` picks the storage root (default `data/`), `MLSAE_SWEEP` the sweep file,
`MLSAE_EXECUTOR` the executor (`multiprocess` default, `in_process`, or `k8s` when
dagster-k8s is installed). Every path the pipeline writes is computed here, so assets agree.

Layout under the root:

    models/<model>/                 transformer (converted GGUF, hub snapshot or tiny model)
    corpus/<model>/{train,test}.safetensors (+ .json sidecars)   TokenChunks.save files
    saes/<model>/<sae>/             MLSAE checkpoint + history.parquet (training curve)
    eval/<model>/<sae>/             side files of the evaluation pass (layer dists tensors)
    figures/<model>/<sae>/          dists_heatmap / prompt_heatmap (.png + .pdf)
    tables/<asset>/<model>__<sae>.parquet   per-config tables; tables/<asset>.parquet others
    state/<asset>/<partition>.json  fingerprints of what each materialization computed
    results.duckdb                  one view per table
"""

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_pipeline.sweep import Sweep, load_sweep

logger = logging.getLogger(__name__)


def default_data_dir() -> str:
    return str(Path(os.environ.get("MLSAE_DATA_DIR", "data")).expanduser().resolve())


def partition_file_stem(partition_key: str | None) -> str:
    """'smollm2|x2-k8-Lall' -> 'smollm2__x2-k8-Lall' (file-name safe)."""
    return "all" if partition_key is None else partition_key.replace("|", "__")


class Storage(dg.ConfigurableResource):
    """The storage root (`MLSAE_DATA_DIR`) and where each artefact lives under it."""

    root: str

    @property
    def path(self) -> Path:
        return Path(self.root)

    def model_dir(self, model: str) -> Path:
        return self.path / "models" / model

    def corpus_path(self, model: str, split: str) -> Path:
        return self.path / "corpus" / model / f"{split}.safetensors"

    def sae_dir(self, model: str, sae: str) -> Path:
        return self.path / "saes" / model / sae

    def eval_dir(self, model: str, sae: str) -> Path:
        return self.path / "eval" / model / sae

    def figures_dir(self, model: str, sae: str | None = None) -> Path:
        base = self.path / "figures" / model
        return base / sae if sae else base

    def table_path(self, asset: str, partition_key: str | None) -> Path:
        if partition_key is None:
            return self.path / "tables" / f"{asset}.parquet"
        return self.path / "tables" / asset / f"{partition_file_stem(partition_key)}.parquet"

    def state_path(self, asset: str, partition_key: str | None) -> Path:
        return self.path / "state" / asset / f"{partition_file_stem(partition_key)}.json"

    @property
    def results_db(self) -> Path:
        return self.path / "results.duckdb"


class SweepResource(dg.ConfigurableResource):
    """The sweep file (`MLSAE_SWEEP`), re-read and validated when a run starts."""

    path: str

    def load(self) -> Sweep:
        return load_sweep(self.path)


def executor_from_env() -> Any:
    """`MLSAE_EXECUTOR`: multiprocess (default), in_process, or k8s (needs dagster-k8s)."""
    kind = os.environ.get("MLSAE_EXECUTOR", "multiprocess").strip().lower()
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "k8s":
        try:
            from dagster_k8s import k8s_job_executor  # type: ignore[import-not-found]
        except ImportError:
            warnings.warn(
                "MLSAE_EXECUTOR=k8s but dagster-k8s is not installed (pip install dagster-k8s); "
                "falling back to the multiprocess executor",
                stacklevel=2,
            )
            return dg.multiprocess_executor
        return k8s_job_executor
    if kind != "multiprocess":
        warnings.warn(
            f"MLSAE_EXECUTOR={kind!r} is unknown (multiprocess, in_process, k8s); "
            "using multiprocess",
            stacklevel=2,
        )
    return dg.multiprocess_executor
