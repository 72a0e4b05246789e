"""The settings of `mlsae explore`, defined once as in mlsae_core.config (its CLI flags, its
limits and the API's request bounds all come from `ExplorerSettings`), and its flags. Kept free
of torch and FastAPI: `mlsae --help` and every other command build this parser.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import Field, StrictInt

from mlsae_core.config import DEVICE_HELP, NO_FLAG, Device, add_arguments, add_data_dir, settings
from mlsae_core.layout import RunLayout, StorageLayout

MIB = 2**20
# A checkpoint's weights file name (model.safetensors), from the one layout.
_WEIGHTS_NAME = RunLayout(Path()).weights.name


@settings
class ExplorerSettings:
    """Where the explorer listens, what it loads beside the checkpoint, and the bounds on one
    request and on its caches (so no request, and no run of requests, grows memory)."""

    host: str = Field(
        "127.0.0.1", description="bind address (loopback only unless you say otherwise)"
    )
    port: StrictInt = Field(8000, gt=0, lt=65536, description="port")
    model_name: str | None = Field(None, description="transformer to load")
    tuned_lens: str | None = Field(
        None,
        description="the tuned lens the MLSAE was trained through, for a checkpoint without "
        "its copy (default: the checkpoint's copy, if any)",
    )
    examples: Path | None = Field(
        None,
        description="max_examples Parquet to read (default: <repo_id>/max_examples.parquet)",
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    max_prompt_tokens: StrictInt = Field(
        128, ge=1, description="longest prompt in tokens (also capped by the model's context)"
    )
    max_prompt_chars: StrictInt = Field(2000, ge=1, description="longest prompt in characters")
    cache_entries: StrictInt = Field(64, ge=1, description="prompts kept in the LRU cache")
    cache_mb: StrictInt = Field(512, ge=1, description="memory bound of the prompt cache, in MiB")
    workers: StrictInt = Field(
        2,
        ge=1,
        description="requests computed at once (the rest wait in order): bounds the working "
        "sets alive",
    )
    max_queue: StrictInt = Field(
        64,
        ge=0,
        description="requests that may wait for a worker; beyond them the answer is 503 + "
        "Retry-After",
    )
    latent_tokens: StrictInt = Field(
        2048,
        ge=1,
        description="held-out tokens a latent page computes on, once (its histogram and "
        "quantile examples, and what the run directory's tables lack)",
    )
    # Bounds of the API (not flags: the page and its tests are built around them).
    max_factor: float = Field(
        1000.0, gt=0, description="largest |steering factor|", json_schema_extra=NO_FLAG
    )
    max_top_k: StrictInt = Field(
        50, ge=1, description="most top tokens in a logits view", json_schema_extra=NO_FLAG
    )
    max_bins: StrictInt = Field(
        100, ge=1, description="most histogram bins", json_schema_extra=NO_FLAG
    )
    max_heatmap_latents: StrictInt = Field(
        256, ge=1, description="most latents in a heatmap", json_schema_extra=NO_FLAG
    )
    max_examples: StrictInt = Field(
        64, ge=1, description="most max-activating examples per request", json_schema_extra=NO_FLAG
    )
    splice_cache_entries: StrictInt = Field(
        256, ge=1, description="splices kept in their LRU cache", json_schema_extra=NO_FLAG
    )
    splice_cache_mb: StrictInt = Field(
        128, ge=1, description="memory bound of the splice cache, in MiB", json_schema_extra=NO_FLAG
    )

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
        help="checkpoint directory (e.g. one listed by --list) or hub repo id (required "
        "unless --list)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the trained checkpoints under --data_dir and exit"
    )
    add_data_dir(p)
    add_arguments(p, ExplorerSettings, from_checkpoint=("model_name",))
