"""Checkpoints of every format a `--repo_id` may name, one module per foreign format with its
reader (and writer) together, as SAELens keeps its `loading/`: `tfm` (the reference's training
module), `sparsify` (EleutherAI), `saelens` (read, and written by `mlsae export`). Our own
format is `mlsae_core.checkpoint`. docs/interop.md describes each mapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlsae_core import checkpoint
from mlsae_core.checkpoint import CheckpointError
from mlsae_core.interop import saelens, sparsify, tfm

# Optional settings and how each is read; absent ones take MLSAE's (= SAEConfig's) defaults.
_OPTIONAL: dict[str, Callable[[Any], Any]] = {
    "auxk": lambda value: value,
    "dead_threshold": float,
    "dead_tokens_threshold": int,
    "standardize": bool,
    "encoder_bias": bool,
}


def read_sae(
    path_or_repo_id: str | Path, **expect: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint directory's (or hub repo id's) MLSAE constructor arguments and tensors, in
    whichever format it is; keyword arguments (e.g. n_inputs=576, k=32) are expectations,
    refused when not met."""
    directory = checkpoint.resolve_checkpoint(path_or_repo_id)
    config, tensors = None, None
    if saelens.holds(directory):
        config, tensors = saelens.read(directory)
    elif found := sparsify.find(directory):
        config, tensors = sparsify.read(found)
    elif tfm.holds(directory):
        config, tensors = tfm.read(directory)
    config = config or checkpoint.read_config(directory)
    for key, want in expect.items():
        if config.get(key) != want:
            raise CheckpointError(
                f"checkpoint {directory} has {key}={config.get(key)!r} but {want!r} was "
                "expected; pick the checkpoint trained for this setting"
            )
    known = {*checkpoint.REQUIRED, *_OPTIONAL}
    kwargs = dict(
        n_inputs=int(config["n_inputs"]),
        n_latents=int(config["n_latents"]),
        k=int(config["k"]),
        metadata={k: v for k, v in config.items() if k not in known},
        **{key: read(config[key]) for key, read in _OPTIONAL.items() if key in config},
    )
    return kwargs, checkpoint.read_tensors(directory) if tensors is None else tensors
