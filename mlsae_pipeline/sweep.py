"""The sweep file: which models and SAE configs to train, with what budgets (YAML users edit).

Loading is YAML parsing plus dataclass validation only (no torch), so Dagster's code server
computes the partitions in milliseconds. Every mistake names the key, the value and what is
allowed (`mlsae_core.config.ConfigError`), e.g. an unknown key or k > n_latents.

Partitions are (model x SAE config): the `model` dimension holds model keys (file-name-safe
slugs of the model names), the `sae` dimension one key per (expansion factor, k, layer set),
e.g. `x2-k16-Lall` or `x2-k16-L9`; a layer set with one layer is a single-layer SAE, the
baseline the paper compares MLSAEs against.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsae_core.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LensConfig,
    RunSpec,
    SAEConfig,
    TrainConfig,
    from_dict,
)
from mlsae_core.identity import model_slug, sae_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = PROJECT_ROOT / "data" / "sweeps"
DEFAULT_SWEEP = "default"

_SECTIONS = {
    "sae": SAEConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "lens": LensConfig,  # training the models' tuned lenses (when grid.tuned_lens has true)
}
_TOP_KEYS = {"name", "description", "models", "grid", "checks", *_SECTIONS}
# swept: every combination is a partition
GRID_KEYS = ("expansion_factor", "k", "layers", "tuned_lens")
# Keys of the earlier sweep format, and where they live now (for a message that says so).
_MOVED = {
    "expansion_factors": "grid.expansion_factor",
    "k": "grid.k",
    "layers": "grid.layers",
    "dataset": "data.dataset",
    "max_length": "data.max_length",
    "test_fraction": "data.test_fraction",
    "device": "train.device (and eval.device)",
    "train.tokens": "data.max_tokens",
    "train.batch_size": "data.batch_size",
    "eval.tokens": "eval.max_tokens",
    "eval.splice_tokens": "eval.splice_max_tokens",
}


@dataclass(frozen=True)
class CheckBounds:
    """Bounds the asset checks enforce on every config's test metrics (averaged over layers)."""

    fvu_max: float = 1.0
    fvu_min: float = 0.0
    dead_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.fvu_min <= self.fvu_max:
            raise ConfigError(
                f"checks.fvu_min={self.fvu_min!r}, fvu_max={self.fvu_max!r} are not allowed: "
                "need 0 <= fvu_min <= fvu_max"
            )
        if not 0 <= self.dead_max <= 1:
            raise ConfigError(f"checks.dead_max={self.dead_max!r} is not allowed: in [0, 1]")


@dataclass(frozen=True)
class SAEPoint:
    """One SAE config of the sweep (the `sae` partition dimension)."""

    expansion_factor: int
    k: int
    layers: tuple[int, ...] | None  # None = every layer of the model
    tuned_lens: bool = False  # trained on the model's tuned-lens-transformed activations

    @property
    def key(self) -> str:
        return sae_key(self.expansion_factor, self.k, self.layers, self.tuned_lens)

    @property
    def single_layer(self) -> bool:
        return self.layers is not None and len(self.layers) == 1


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the models, the grid of SAE configs and the shared settings."""

    path: Path
    name: str
    models: dict[str, str]  # model key (slug) -> model name as written
    points: tuple[SAEPoint, ...]
    sae: SAEConfig  # shared SAE settings (expansion_factor and k are per point)
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    checks: CheckBounds = field(default_factory=CheckBounds)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def model_keys(self) -> list[str]:
        return list(self.models)

    @property
    def sae_keys(self) -> list[str]:
        return [p.key for p in self.points]

    @property
    def wants_lens(self) -> bool:
        """Whether any config trains through a tuned lens (so the models need one)."""
        return any(p.tuned_lens for p in self.points)

    def point(self, key: str) -> SAEPoint:
        for p in self.points:
            if p.key == key:
                return p
        raise ConfigError(
            f"SAE config {key!r} is not in the sweep {self.path} (configs: {self.sae_keys}); "
            "reload the definitions after editing the sweep file"
        )

    def model_name(self, key: str) -> str:
        if key not in self.models:
            raise ConfigError(
                f"model {key!r} is not in the sweep {self.path} (models: {self.model_keys})"
            )
        return self.models[key]

    def sae_config(self, point: SAEPoint) -> SAEConfig:
        return dataclasses.replace(self.sae, expansion_factor=point.expansion_factor, k=point.k)

    def run_spec(
        self, point: SAEPoint, model_name: str, lens_dir: str | os.PathLike[str] | None = None
    ) -> RunSpec:
        """What one partition trains: `model_name` is the model as the pipeline loads it,
        `lens_dir` the model's tuned lens (used when the point has tuned_lens; the asset that
        trains passes it, callers that only need shapes and budgets need not)."""
        return RunSpec(
            model_name=model_name,
            layers=point.layers,
            tuned_lens=str(lens_dir) if point.tuned_lens and lens_dir else None,
            sae=self.sae_config(point),
            data=self.data,
            train=self.train,
        )


def validate_against_models(sweep: Sweep, models_dir: Path | None = None) -> None:
    """Check every config of the sweep against its model's shape before anything trains
    (k vs n_latents, layers, max_length vs context); the message names the config."""
    from mlsae_core.runs import check_spec
    from mlsae_core.transformer import looks_like_path, model_shape

    dataset = sweep.data.dataset
    if looks_like_path(dataset) and not Path(dataset).expanduser().exists():
        raise ConfigError(
            f"sweep {sweep.path}: data.dataset={dataset!r} is not allowed: no such file or "
            "directory; give an existing path, 'brown', a source under the storage root's sources/ "
            "or a hub dataset id"
        )
    for key, name in sweep.models.items():
        shape = model_shape(name, models_dir)
        for point in sweep.points:
            try:
                check_spec(sweep.run_spec(point, name), shape)
            except ConfigError as exc:
                raise ConfigError(f"sweep {sweep.path}, config {key}|{point.key}: {exc}") from exc


def sweep_path(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """`MLSAE_SWEEP` (a path, or a name under data/sweeps/), else data/sweeps/default.yaml."""
    value = str(name_or_path or os.environ.get("MLSAE_SWEEP") or DEFAULT_SWEEP)
    path = Path(value).expanduser()
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = SWEEPS_DIR / f"{value}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise ConfigError(
            f"sweep file {path} does not exist; set MLSAE_SWEEP to a YAML path or one of {known}"
        )
    return path.resolve()


def _bool_list(value: Any, where: str) -> list[bool]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}={value!r} is not allowed: a list of true/false")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}={value!r} is not allowed: a value is listed twice")
    return values


def _int_list(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}={value!r} is not allowed: an integer or a list of integers")
    return values


def _layer_sets(value: Any) -> list[tuple[int, ...] | None]:
    items = value if isinstance(value, list) else [value]
    out: list[tuple[int, ...] | None] = []
    for item in items:
        if item == "all" or item is None:
            out.append(None)
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append((item,))
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
        ):
            out.append(tuple(sorted(set(item))))
        else:
            raise ConfigError(
                f"layers entry {item!r} is not allowed: 'all', a layer id >= 0, or a list of "
                "layer ids (a single layer gives a single-layer SAE baseline)"
            )
    return out


def _moved_keys(raw: dict[str, Any]) -> list[str]:
    found = [k for k in raw if k in _MOVED]
    for section in ("train", "eval"):
        found += [f"{section}.{k}" for k in raw.get(section) or {} if f"{section}.{k}" in _MOVED]
    return found


def parse_sweep(raw: Any, path: Path) -> Sweep:
    """Validate a parsed sweep mapping; every error names the key and what is allowed."""
    where = f"sweep file {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of keys (models, grid, sae, ...)")
    moved = [k for k in _moved_keys(raw) if k not in _TOP_KEYS]
    if moved:
        hints = ", ".join(f"{k} -> {_MOVED[k]}" for k in moved)
        raise ConfigError(f"{where} uses keys of the earlier sweep format: {hints}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(_TOP_KEYS)}"
        )
    models_raw = raw.get("models")
    if isinstance(models_raw, str):
        models_raw = [models_raw]
    if not models_raw or not all(isinstance(m, str) and m for m in models_raw):
        raise ConfigError(f"models={models_raw!r} in {where} is not allowed: a list of model names")
    models: dict[str, str] = {}
    for name in models_raw:
        key = model_slug(name)
        if key in models:
            raise ConfigError(
                f"models in {where}: {name!r} and {models[key]!r} share the key {key!r}"
            )
        models[key] = name

    sections = {
        name: dict(raw.get(name) or {}) for name in _SECTIONS
    }  # each section holds fields of its dataclass, named as in mlsae_core.config
    grid = dict(raw.get("grid") or {})
    bad_grid = sorted(set(grid) - set(GRID_KEYS))
    if bad_grid:
        raise ConfigError(
            f"unknown key(s) {bad_grid} in grid: of {where}; allowed keys are {list(GRID_KEYS)}"
        )
    swept = sorted(set(sections["sae"]) & set(GRID_KEYS))
    if swept:
        raise ConfigError(
            f"sae.{swept[0]} in {where} is not allowed: sweep it with grid.{swept[0]}"
        )
    sae = from_dict(SAEConfig, sections["sae"], where=f"sae: of {where}")
    efs = _int_list(grid.get("expansion_factor", [sae.expansion_factor]), "grid.expansion_factor")
    ks = _int_list(grid.get("k", [sae.k]), "grid.k")
    layer_sets = _layer_sets(grid.get("layers", ["all"]))
    lenses = _bool_list(grid.get("tuned_lens", [False]), "grid.tuned_lens")
    points = []
    for ef, k, layers, lens in itertools.product(efs, ks, layer_sets, lenses):
        from_dict(SAEConfig, {**sections["sae"], "expansion_factor": ef, "k": k}, where=where)
        points.append(SAEPoint(ef, k, layers, lens))
    keys = [p.key for p in points]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where} lists the same SAE config twice: {keys}")
    data = from_dict(DataConfig, sections["data"], where=f"data: of {where}")
    train = from_dict(TrainConfig, sections["train"], where=f"train: of {where}")
    ev = from_dict(EvalConfig, sections["eval"], where=f"eval: of {where}")
    lens_cfg = from_dict(LensConfig, sections["lens"], where=f"lens: of {where}")
    checks = from_dict(CheckBounds, dict(raw.get("checks") or {}), where=f"checks: of {where}")
    return Sweep(
        path=path,
        name=str(raw.get("name", path.stem)),
        models=models,
        points=tuple(points),
        sae=sae,
        data=data,
        train=train,
        eval=ev,
        lens=lens_cfg,
        checks=checks,
        raw=raw,
    )


def load_sweep(name_or_path: str | os.PathLike[str] | None = None) -> Sweep:
    """Read and validate a sweep file (YAML only: fast enough for definitions load)."""
    import yaml

    path = sweep_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from exc
    return parse_sweep(raw, path)
