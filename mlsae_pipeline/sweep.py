"""The sweep file: which models and SAE configs to train, with what budgets (YAML users edit).

The file is one pydantic model (`Sweep`) whose sections are the settings classes of
mlsae_core.config (sae/data/train/eval/lens, plus grid and checks), so pydantic refuses an
unknown key by itself, naming it and its section, and every range is the settings' own.
Loading is YAML parsing plus validation only (no torch), so Dagster's code server computes the
partitions in milliseconds; a mistake raises `mlsae_core.config.ConfigError` in one line.

Partitions are (model x SAE config): the `model` dimension holds model keys (file-name-safe
slugs of the model names), the `sae` dimension one key per (expansion factor, k, layer set,
inputs, seed), e.g. `x2-k16-Lall`, `x2-k16-L9` or `x2-k16-L9-s1`; a layer set with one layer
is a single-layer SAE, the baseline the paper compares MLSAEs against. `grid` is one mapping
(every combination of its lists) or a list of them (the union), so baselines can take more
seeds or layers than the MLSAEs without multiplying the costly configs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from mlsae_core.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LensConfig,
    ProbeConfig,
    RunSpec,
    SAEConfig,
    TrainConfig,
    config_error,
    settings,
)
from mlsae_core.identity import model_slug, sae_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = PROJECT_ROOT / "data" / "sweeps"
DEFAULT_SWEEP = "default"


@settings
class CheckBounds:
    """Bounds the asset checks enforce on every config's test metrics (averaged over layers)."""

    fvu_max: float = Field(1.0, ge=0, description="largest average test FVU")
    fvu_min: float = Field(0.0, ge=0, description="smallest average test FVU")
    dead_max: float = Field(1.0, ge=0, le=1, description="largest dead-latent fraction")

    def __post_init__(self) -> None:
        if self.fvu_min > self.fvu_max:
            raise ConfigError(
                f"checks.fvu_min={self.fvu_min!r}, fvu_max={self.fvu_max!r} are not allowed: "
                "need 0 <= fvu_min <= fvu_max"
            )


@dataclass(frozen=True)
class SAEPoint:
    """One SAE config of the sweep (the `sae` partition dimension)."""

    expansion_factor: int
    k: int
    layers: tuple[int, ...] | None  # None = every layer of the model
    tuned_lens: bool = False  # trained on the model's tuned-lens-transformed activations
    seed: int = 0  # training seed (initialisation and data order)

    @property
    def key(self) -> str:
        return sae_key(self.expansion_factor, self.k, self.layers, self.tuned_lens, self.seed)

    @property
    def single_layer(self) -> bool:
        return self.layers is not None and len(self.layers) == 1


def _layer_set(item: Any) -> tuple[int, ...] | None:
    def layer_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if item == "all" or item is None:
        return None
    if layer_id(item):
        return (item,)
    if isinstance(item, list) and item and all(layer_id(v) for v in item):
        return tuple(sorted(set(item)))
    raise ValueError(
        f"layers entry {item!r} is not allowed: 'all', a layer id >= 0, or a list of "
        "layer ids (a single layer gives a single-layer SAE baseline)"
    )


class Grid(BaseModel):
    """The swept settings: every combination is a partition (a single value is a list of one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    expansion_factor: list[StrictInt] = [SAEConfig().expansion_factor]
    k: list[StrictInt] = [SAEConfig().k]
    layers: list[tuple[int, ...] | None] = [None]
    tuned_lens: list[StrictBool] = [False]
    # training seeds (initialisation, data order); every seed of a config reads the same
    # documents, split by train.seed. None: train.seed alone
    seed: list[StrictInt] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> list[Any] | None:
        return value if isinstance(value, list) or value is None else [value]

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_sets(cls, value: list[Any]) -> list[tuple[int, ...] | None]:
        return [_layer_set(item) for item in value]


GRID_KEYS = tuple(Grid.model_fields)  # swept: every combination is a partition


class Sweep(BaseModel):
    """A parsed sweep file: the models, the grid of SAE configs and the shared settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = ""
    description: str = ""
    models: dict[str, str]  # model key (slug) -> model name as written (a list in the file)
    grid: list[Grid] = [Grid()]  # a mapping in the file, or a list of them (the union)
    sae: SAEConfig = SAEConfig()  # shared SAE settings (expansion_factor and k are per point)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    lens: LensConfig = LensConfig()  # training the models' tuned lenses (grid.tuned_lens true)
    probe: ProbeConfig | None = None  # k-sparse probing of every config (none: no probe assets)
    checks: CheckBounds = CheckBounds()
    _path: Path = PrivateAttr(Path("sweep.yaml"))
    _points: tuple[SAEPoint, ...] = PrivateAttr(())

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise ValueError("it must hold a mapping of keys (models, grid, sae, ...)")
        swept = sorted(set(raw.get("sae") or {}) & set(GRID_KEYS))
        if swept:
            raise ValueError(f"sae.{swept[0]} is not allowed: sweep it with grid.{swept[0]}")
        return {k: v for k, v in raw.items() if v is not None}  # an empty section: defaults

    @field_validator("models", mode="before")
    @classmethod
    def _model_keys(cls, value: Any) -> dict[str, str]:
        names = [value] if isinstance(value, str) else value
        if (
            not names
            or not isinstance(names, list)
            or not all(isinstance(m, str) and m for m in names)
        ):
            raise ValueError(f"models={value!r} is not allowed: a list of model names")
        models: dict[str, str] = {}
        for name in names:
            key = model_slug(name)
            if key in models:
                raise ValueError(f"models: {name!r} and {models[key]!r} share the key {key!r}")
            models[key] = name
        return models

    @field_validator("grid", mode="before")
    @classmethod
    def _grids(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _grid_points(self) -> Sweep:
        points = [
            SAEPoint(ef, k, layers, lens, seed)
            for g in self.grid
            for ef, k, layers, lens, seed in itertools.product(
                g.expansion_factor, g.k, g.layers, g.tuned_lens, g.seed or [self.train.seed]
            )
        ]
        for p in points:
            self.sae_config(p)  # each point's SAE settings are in range (ConfigError names them)
        keys = [p.key for p in points]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"the sweep lists the same SAE config twice: {twice}")
        self._points = tuple(points)
        return self

    @property
    def path(self) -> Path:
        return self._path

    @property
    def points(self) -> tuple[SAEPoint, ...]:
        return self._points

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

    @property
    def held_out_tokens(self) -> int:
        """Held-out tokens to tokenize: enough for the evaluation and for resid_cos_sim."""
        return max(self.eval.max_tokens, self.eval.resid_tokens)

    def train_tokens(self, model: str) -> int:
        """Training tokens to tokenize for `model`: the largest budget any config reads
        (data.train_token_budget: whole optimiser steps)."""
        from mlsae_core.data import train_token_budget

        world = self.train.nproc_per_node
        return max(train_token_budget(self.run_spec(p, self.model_name(model)), world)
                   for p in self.points)  # fmt: skip

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
            train=dataclasses.replace(self.train, seed=point.seed),
            split_seed=self.train.seed,  # the model's one corpus split, shared by every config
        )


# The sections that are settings classes of mlsae_core.config, by name.
_SECTIONS = {
    name: Sweep.model_fields[name].annotation for name in ("sae", "data", "train", "eval", "lens")
}


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
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        path = SWEEPS_DIR / f"{value}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise ConfigError(
            f"sweep file {path} does not exist; set MLSAE_SWEEP to a YAML path or one of {known}"
        )
    return path.resolve()


def parse_sweep(raw: Any, path: Path) -> Sweep:
    """Validate a parsed sweep mapping; every error names the key and what is allowed."""
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, Sweep, f"sweep file {path}") from None
    if not sweep.name:
        sweep = sweep.model_copy(update={"name": path.stem})
    sweep._path = path
    return sweep


def read_yaml(path: Path) -> Any:
    """`yaml.safe_load` that refuses a key written twice in one mapping (YAML keeps the later
    one silently, so the sweep would run with settings its author did not see)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"sweep file {path}: key {key!r} is written twice (lines {seen[key]} "
                        f"and {line}); keep one"
                    )
                seen[key] = line
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from exc


def load_sweep(name_or_path: str | os.PathLike[str] | None = None) -> Sweep:
    """Read and validate a sweep file (YAML only: fast enough for definitions load)."""
    path = sweep_path(name_or_path)
    return parse_sweep(read_yaml(path), path)
