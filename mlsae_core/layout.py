"""Where everything lives: one storage layout for the CLI, the pipeline and the explorer.

A trained MLSAE is a *run directory*: its checkpoint, training curve, every per-run table and
figure sit side by side, under the same file names whether `mlsae analyse` or the pipeline
wrote them (the table name is the file stem and the Dagster asset name). The pipeline keeps
its run directories under one storage root:

    <root>/models/<model>/                       transformers (converted GGUF, snapshots, local)
    <root>/sources/                              raw text sources (the Brown corpus, local ones)
    <root>/corpus/<model>/{train,test}.safetensors   tokenized chunks (+ .json sidecars)
    <root>/cache/<model>/                        activation cache shared by a sweep's configs
    <root>/saes/<model>/<sae>/                   run directories (see RunLayout)
    <root>/tables/<name>.parquet                 cross-config tables (test_summary, mmcs, ...)
    <root>/tables/<name>/<model>.parquet         per-model tables (resid_cos_sim)
    <root>/figures/                              cross-config figures
    <root>/report/                               the claims report (report.html, report.md)
    <root>/results.duckdb                        one DuckDB view per table

The root is `$MLSAE_DATA_DIR`, else `data/` in the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "MLSAE_DATA_DIR"

# Per-run tables (file stem == table name == pipeline asset name), in the order they are made:
# those of one evaluation pass (analyse.analysis_tables), then the prompt heatmap and probes.
PASS_TABLES = (
    "test_metrics",
    "latent_dists",
    "latent_layer_dists",
    "dists_summary",
    "layer_variance",
    "latent_variance",
    "max_examples",
)
RUN_TABLES = (*PASS_TABLES, "prompt_heatmap", "probes")
# Per-run figures (stems; each is written as .png for the UI and .pdf for papers).
RUN_FIGURES = ("training_curve", "dists_heatmap", "layer_mean_hist", "prompt_heatmap")


def data_root() -> Path:
    """The storage root: `$MLSAE_DATA_DIR`, else `data/` in the current directory."""
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser().resolve()


@dataclass(frozen=True)
class RunLayout:
    """One MLSAE's directory: checkpoint + training curve + its tables and figures."""

    directory: Path

    @property
    def weights(self) -> Path:
        return self.directory / "model.safetensors"

    @property
    def config(self) -> Path:
        return self.directory / "config.json"

    @property
    def history(self) -> Path:
        return self.directory / "history.parquet"

    @property
    def metrics_csv(self) -> Path:
        return self.directory / "test_metrics.csv"

    @property
    def lens(self) -> Path:
        """The tuned lens a run was trained through, copied in so the run is self-contained."""
        return self.directory / "lens"

    def table(self, name: str) -> Path:
        if name not in RUN_TABLES:
            raise ValueError(f"{name!r} is not a per-run table; known: {', '.join(RUN_TABLES)}")
        return self.directory / f"{name}.parquet"

    def figure(self, name: str, suffix: str = ".png") -> Path:
        if name not in RUN_FIGURES:
            raise ValueError(f"{name!r} is not a per-run figure; known: {', '.join(RUN_FIGURES)}")
        return self.directory / f"{name}{suffix}"

    def figure_stem(self, name: str) -> Path:
        """Path without suffix, as the figure writers take it (they add .png and .pdf)."""
        return self.figure(name, "")


@dataclass(frozen=True)
class StorageLayout:
    """The pipeline's storage root and where each artefact lives under it."""

    root: Path

    @classmethod
    def from_env(cls) -> StorageLayout:
        return cls(data_root())

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    def model_dir(self, model: str) -> Path:
        return self.models_dir / model

    def corpus_path(self, model: str, split: str) -> Path:
        return self.root / "corpus" / model / f"{split}.safetensors"

    def cache_dir(self, model: str) -> Path:
        return self.root / "cache" / model

    def lens_dir(self, model: str) -> Path:
        """The model's tuned lens (the `tuned_lens` asset)."""
        return self.root / "lenses" / model

    def run(self, model: str, sae: str) -> RunLayout:
        return RunLayout(self.root / "saes" / model / sae)

    def runs(self) -> list[RunLayout]:
        """Every run directory that holds a checkpoint, sorted."""
        return [RunLayout(p.parent) for p in sorted(self.root.glob("saes/*/*/config.json"))]

    def run_table_glob(self, name: str) -> str:
        """The glob over every run's copy of a per-run table (DuckDB's read_parquet takes it)."""
        RunLayout(self.root).table(name)  # validates the name
        return str(self.root / "saes" / "*" / "*" / f"{name}.parquet")

    def table(self, name: str) -> Path:
        """A cross-config table."""
        return self.root / "tables" / f"{name}.parquet"

    def model_table(self, name: str, model: str) -> Path:
        """A per-model table (resid_cos_sim): one file per model."""
        return self.root / "tables" / name / f"{model}.parquet"

    def model_table_glob(self, name: str) -> str:
        return str(self.model_table(name, "*"))

    def model_figure_stem(self, name: str, model: str) -> Path:
        """A per-model figure, named as `mlsae figures` names it (resid_cos_sim_<model>)."""
        return self.figures_dir / f"{name}_{model}"

    @property
    def figures_dir(self) -> Path:
        """Cross-config figures."""
        return self.root / "figures"

    @property
    def report_dir(self) -> Path:
        """The claims report (report.html, report.md, claims.parquet and its figures)."""
        return self.root / "report"

    @property
    def results_db(self) -> Path:
        return self.root / "results.duckdb"

    @staticmethod
    def containing(run_dir: str | Path) -> tuple[StorageLayout, str, str] | None:
        """(layout, model, sae) when `run_dir` is `<root>/saes/<model>/<sae>`, else None."""
        run_dir = Path(run_dir).resolve()
        if run_dir.parent.parent.name != "saes":
            return None
        return StorageLayout(run_dir.parent.parent.parent), run_dir.parent.name, run_dir.name
