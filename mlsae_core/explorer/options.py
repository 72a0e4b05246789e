"""The settings of `mlsae explore`, defined once, and its command-line flags.

`ExplorerSettings` is the one definition of every default: the CLI's flags are generated
from its fields (`config.add_arguments`), `run` builds it back from them (`config.from_args`),
the explorer reads its limits from it and the API's request bounds are its defaults. Kept
free of torch and FastAPI: `mlsae --help` and every other command build this parser.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlsae_core.config import VALID_DEVICES, ConfigError, add_arguments, setting
from mlsae_core.layout import RunLayout, StorageLayout

MIB = 2**20
# A checkpoint's weights file name (model.safetensors), from the one layout.
_WEIGHTS_NAME = RunLayout(Path()).weights.name


_POSITIVE_INTS = (
    "max_prompt_tokens",
    "max_prompt_chars",
    "cache_entries",
    "cache_mb",
    "max_top_k",
    "max_bins",
    "max_heatmap_latents",
    "max_examples",
    "splice_cache_entries",
    "splice_cache_mb",
    "workers",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(value: object, name: str, ok: Callable[[object], bool], allowed: str) -> None:
    """Refuse a bad setting before anything loads, naming it the way the CLI and config do."""
    if not ok(value):
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class ExplorerSettings:
    """Where the explorer listens, what it loads beside the checkpoint, and the bounds on one
    request and on its caches (so no request, and no run of requests, grows memory)."""

    host: str = setting("127.0.0.1", "bind address (loopback only unless you say otherwise)")
    port: int = setting(8000, "port")
    model_name: str | None = setting(None, "transformer to load")
    tuned_lens: str | None = setting(
        None, "the tuned lens the MLSAE was trained through, for a checkpoint without its copy"
    )
    examples: Path | None = setting(
        None, "max_examples Parquet to read instead of <repo_id>/max_examples.parquet"
    )
    device: str = setting("cpu", "cpu, cuda, or auto (cuda when available)", choices=VALID_DEVICES)
    max_prompt_tokens: int = setting(
        128, "longest prompt in tokens (also capped by the model's context)"
    )
    max_prompt_chars: int = setting(2000, "longest prompt in characters")
    cache_entries: int = setting(64, "prompts kept in the LRU cache")
    cache_mb: int = setting(512, "memory bound of the prompt cache, in MiB")
    workers: int = setting(
        2, "requests computed at once (the rest wait in order): bounds the working sets alive"
    )
    max_queue: int = setting(
        64, "requests that may wait for a worker; beyond them the answer is 503 + Retry-After"
    )
    # Bounds of the API (not flags: the page and its tests are built around them).
    max_factor: float = setting(1000.0, "largest |steering factor|", cli=False)
    max_top_k: int = setting(50, "most top tokens in a logits view", cli=False)
    max_bins: int = setting(100, "most histogram bins", cli=False)
    max_heatmap_latents: int = setting(256, "most latents in a heatmap", cli=False)
    max_examples: int = setting(64, "most max-activating examples per request", cli=False)
    splice_cache_entries: int = setting(256, "splices kept in their LRU cache", cli=False)
    splice_cache_mb: int = setting(128, "memory bound of the splice cache, in MiB", cli=False)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            _require(getattr(self, name), name, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _require(self.max_queue, "max_queue", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _require(self.port, "port", lambda v: _is_int(v) and 0 < v < 65536, "1..65535")
        _require(self.max_factor, "max_factor", lambda v: v > 0, "a number > 0")
        _require(self.device, "device", VALID_DEVICES.__contains__, f"one of {VALID_DEVICES}")

    @property
    def cache_bytes(self) -> int:
        return self.cache_mb * MIB

    @property
    def splice_cache_bytes(self) -> int:
        return self.splice_cache_mb * MIB


def is_checkpoint(directory: Path) -> bool:
    """An MLSAE checkpoint: weights plus a config.json that describes an SAE."""
    run = RunLayout(Path(directory))
    if not (run.weights.is_file() and run.config.is_file()):
        return False
    try:
        meta = json.loads(run.config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "n_latents" in meta


def find_checkpoints(root: Path, max_depth: int = 6) -> list[Path]:
    """Checkpoint directories under `root`, sorted: the runs of a storage root and any other
    checkpoint directory (runs/..., a copied snapshot) up to `max_depth` levels down."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {run.directory for run in StorageLayout(root).runs()}
    for weights in root.rglob(_WEIGHTS_NAME):
        if len(weights.relative_to(root).parts) <= max_depth + 1:
            found.add(weights.parent)
    return sorted(d for d in found if is_checkpoint(d))


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of `mlsae explore`: what to open, then one per `ExplorerSettings` field."""
    p.add_argument(
        "--repo_id",
        default=None,
        help="checkpoint directory (e.g. one listed by --list) or hub repo id",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the trained checkpoints under $MLSAE_DATA_DIR (or --root) and exit",
    )
    p.add_argument("--root", type=Path, default=None, help="where --list looks")
    add_arguments(p, ExplorerSettings, from_checkpoint=("model_name",))


__all__ = ["ExplorerSettings", "add_args", "find_checkpoints", "is_checkpoint"]
