"""Settings for the SAE, the data and training, validated before any compute starts.

Every check names the field, the bad value and what is allowed, so a typo in a sweep file
or a CLI flag costs a message rather than an hour of compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VALID_DEVICES = ("cpu", "cuda", "auto")
# Precision of the splice metrics' logit-difference GEMM (evaluate.resolve_delta_dtype).
DELTA_DTYPE_CHOICES = ("auto", "float32", "bfloat16")


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message says which and what is allowed."""


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class SAEConfig:
    """The MLSAE's shape and sparsity (SPEC section 3)."""

    expansion_factor: int = 64
    k: int = 32
    auxk: int | None = 256
    auxk_coef: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000
    dead_threshold: float = 1e-3
    standardize: bool = True

    def __post_init__(self) -> None:
        _check(
            isinstance(self.expansion_factor, int) and self.expansion_factor >= 1,
            "expansion_factor",
            self.expansion_factor,
            "an integer >= 1",
        )
        _check(isinstance(self.k, int) and self.k >= 1, "k", self.k, "an integer >= 1")
        _check(
            self.auxk is None or (isinstance(self.auxk, int) and self.auxk >= 1),
            "auxk",
            self.auxk,
            "None or an integer >= 1",
        )
        _check(self.auxk_coef >= 0, "auxk_coef", self.auxk_coef, "a number >= 0")
        _check(
            self.dead_tokens_threshold >= 1,
            "dead_tokens_threshold",
            self.dead_tokens_threshold,
            "an integer >= 1",
        )

    def n_latents(self, d_model: int) -> int:
        n = self.expansion_factor * d_model
        _check(self.k <= n, "k", self.k, f"at most n_latents = expansion_factor*d = {n}")
        return n


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into token chunks (SPEC section 2)."""

    dataset: str = "monology/pile-uncopyrighted"
    max_length: int = 2048
    batch_size: int = 1
    max_tokens: int = 1_000_000_000
    test_fraction: float = 0.1
    text_field: str = "text"
    split: str = "train"

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "dataset", self.dataset, "a hub id, a path, or 'brown'")
        _check(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1 (tokens)")
        _check(
            0.0 <= self.test_fraction < 1.0,
            "test_fraction",
            self.test_fraction,
            "a fraction in [0, 1)",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (SPEC section 3); defaults are the reference's."""

    lr: float = 1e-4
    eps: float = 6.25e-10
    accumulate_grad_batches: int = 64
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"
    log_every: int = 1

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.eps > 0, "eps", self.eps, "a number > 0")
        _check(
            self.accumulate_grad_batches >= 1,
            "accumulate_grad_batches",
            self.accumulate_grad_batches,
            "an integer >= 1",
        )
        _check(
            self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1"
        )
        _check(self.device in VALID_DEVICES, "device", self.device, f"one of {VALID_DEVICES}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' without one is an error."""
    import torch

    _check(device in VALID_DEVICES, "device", device, f"one of {VALID_DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: no CUDA device is visible; use 'cpu'")
    return device


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build a config dataclass from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(names)}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = [
    "ConfigError",
    "DataConfig",
    "SAEConfig",
    "TrainConfig",
    "field",
    "from_dict",
    "resolve_device",
    "to_dict",
]
