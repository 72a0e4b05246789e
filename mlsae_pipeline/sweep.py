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

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsae_core.config import (
    DELTA_DTYPE_CHOICES,
    ConfigError,
    DataConfig,
    SAEConfig,
    TrainConfig,
    from_dict,
)
from mlsae_core.runs import model_slug

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = PROJECT_ROOT / "data" / "sweeps"
DEFAULT_SWEEP = "default"

_TOP_KEYS = {
    "name",
    "description",
    "models",
    "dataset",
    "max_length",
    "test_fraction",
    "device",
    "expansion_factors",
    "k",
    "layers",
    "sae",
    "train",
    "eval",
    "checks",
}
# Keys of `train:` that are not TrainConfig fields.
_TRAIN_EXTRA = {"tokens", "batch_size", "nproc_per_node"}
_SAE_FORBIDDEN = {"expansion_factor", "k"}  # swept at the top level


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation pass per config: metrics, layer distributions and max examples."""

    tokens: int = 2048  # test tokens for reconstruction metrics, dists and examples
    splice_tokens: int = 256  # of those, tokens with splice metrics (dCE, KL): the slow part
    batch_size: int = 4
    n_examples: int = 8
    n_context: int = 4
    resid_tokens: int = 2048  # tokens for the residual cosine similarity (per model)
    prompt: str = "When Mary and John went to the store, John gave a drink to"
    delta_dtype: str = "auto"  # splice logit GEMM: float32 (exact) or bfloat16; auto picks

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "n_examples", "resid_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"eval.{name}={v!r} is not allowed: an integer >= 1")
        for name in ("splice_tokens", "n_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"eval.{name}={v!r} is not allowed: an integer >= 0")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError("eval.prompt is not allowed to be empty")
        if self.delta_dtype not in DELTA_DTYPE_CHOICES:
            raise ConfigError(
                f"eval.delta_dtype={self.delta_dtype!r} is not allowed: one of "
                f"{', '.join(DELTA_DTYPE_CHOICES)}"
            )


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

    @property
    def key(self) -> str:
        label = "all" if self.layers is None else "_".join(map(str, self.layers))
        return f"x{self.expansion_factor}-k{self.k}-L{label}"

    @property
    def single_layer(self) -> bool:
        return self.layers is not None and len(self.layers) == 1


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    models: dict[str, str]  # model key (slug) -> model name as written
    points: tuple[SAEPoint, ...]
    sae: SAEConfig  # shared SAE settings (expansion_factor and k are per point)
    data: DataConfig
    train: TrainConfig
    nproc_per_node: int = 1
    eval: EvalSettings = field(default_factory=EvalSettings)
    checks: CheckBounds = field(default_factory=CheckBounds)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def model_keys(self) -> list[str]:
        return list(self.models)

    @property
    def sae_keys(self) -> list[str]:
        return [p.key for p in self.points]

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
        values = {**self.sae.__dict__, "expansion_factor": point.expansion_factor, "k": point.k}
        return SAEConfig(**values)


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


def parse_sweep(raw: Any, path: Path) -> Sweep:
    """Validate a parsed sweep mapping; every error names the key and what is allowed."""
    where = f"sweep file {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of keys (models, k, layers, ...)")
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

    sae_raw = dict(raw.get("sae") or {})
    bad = sorted(set(sae_raw) & _SAE_FORBIDDEN)
    if bad:
        raise ConfigError(
            f"sae.{bad[0]} in {where} is not allowed: sweep it with the top-level keys "
            "expansion_factors and k"
        )
    sae = from_dict(SAEConfig, sae_raw, where=f"sae: of {where}")
    efs = _int_list(raw.get("expansion_factors", [sae.expansion_factor]), "expansion_factors")
    ks = _int_list(raw.get("k", [sae.k]), "k")
    layer_sets = _layer_sets(raw.get("layers", ["all"]))
    points = []
    for ef, k, layers in itertools.product(efs, ks, layer_sets):
        from_dict(SAEConfig, {**sae_raw, "expansion_factor": ef, "k": k}, where=where)
        points.append(SAEPoint(ef, k, layers))
    keys = [p.key for p in points]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where} lists the same SAE config twice: {keys}")

    train_raw = dict(raw.get("train") or {})
    extra = {k: train_raw.pop(k) for k in list(train_raw) if k in _TRAIN_EXTRA}
    device = raw.get("device", "cpu")
    if "device" in train_raw:
        raise ConfigError(f"train.device in {where} is not allowed: use the top-level key device")
    train = from_dict(TrainConfig, {**train_raw, "device": device}, where=f"train: of {where}")
    nproc = extra.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"train.nproc_per_node={nproc!r} is not allowed: an integer >= 1")
    data = DataConfig(
        dataset=raw.get("dataset", "brown"),
        max_length=raw.get("max_length", 128),
        batch_size=extra.get("batch_size", 1),
        max_tokens=extra.get("tokens", 4096),
        test_fraction=raw.get("test_fraction", 0.1),
    )
    ev = from_dict(EvalSettings, dict(raw.get("eval") or {}), where=f"eval: of {where}")
    checks = from_dict(CheckBounds, dict(raw.get("checks") or {}), where=f"checks: of {where}")
    return Sweep(
        path=path,
        name=str(raw.get("name", path.stem)),
        models=models,
        points=tuple(points),
        sae=sae,
        data=data,
        train=train,
        nproc_per_node=nproc,
        eval=ev,
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
