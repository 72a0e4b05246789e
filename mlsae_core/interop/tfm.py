"""The reference's training-module checkpoints (`...-tfm` repos): one model.safetensors with
`autoencoder.*`, `transformer.model.*` and optionally `lens.*` tensors, and the training
module's settings as config.json. Read only: mlsae writes its own format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mlsae_core import checkpoint as ck
from mlsae_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

FORMAT = "tfm"  # metadata["source_format"]: settings mapped from the training module's
AUTOENCODER, TRANSFORMER, LENS = "autoencoder.", "transformer.model.", "lens."
_LAYER_INDEX = re.compile(r"^transformer\.model\..*?\.(?:layers|h)\.(\d+)\.")


def holds(directory: Path) -> bool:
    """Whether `directory` is a training-module checkpoint: the file's layout says so, not its
    (copied) metadata."""
    return (directory / CONFIG_NAME).is_file() and ck.has_prefix(directory, AUTOENCODER)


def read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An MLSAE config and tensors: the settings as metadata, shapes from the `autoencoder.*`
    tensors, `tuned_lens` when the file holds `lens.*`."""
    ck.verify_files(directory, [WEIGHTS_NAME, CONFIG_NAME])
    cfg_path = directory / CONFIG_NAME
    weights = directory / WEIGHTS_NAME
    settings = ck.read_json(cfg_path)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object of settings")
    shapes = ck.tensor_shapes(weights)  # readable: `holds` found autoencoder.*
    names = list(shapes)
    enc = shapes.get(AUTOENCODER + "encoder.weight")
    dec = shapes.get(AUTOENCODER + "decoder.weight")
    if enc is None or dec is None or len(enc) != 2 or len(dec) != 2:
        raise CheckpointError(
            f"{weights} has autoencoder.* tensors but no 2-d autoencoder.encoder.weight and "
            "autoencoder.decoder.weight; not a reference training-module checkpoint"
        )
    config = {**settings, "n_latents": int(enc[0]), "n_inputs": int(dec[0])}
    config["source_format"] = FORMAT
    config["tuned_lens"] = bool(settings.get("tuned_lens")) or any(
        n.startswith(LENS) for n in names
    )
    factor = settings.get("expansion_factor")
    if isinstance(factor, int) and factor * config["n_inputs"] != config["n_latents"]:
        raise CheckpointError(
            f"{cfg_path}: expansion_factor={factor} but the autoencoder has "
            f"{config['n_latents']} latents for {config['n_inputs']} inputs"
        )
    if not settings.get("layers") and "n_model_layers" not in settings:
        # layers=None means every layer; count them from the transformer's tensor names.
        found = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
        if found and any(n.startswith(TRANSFORMER) for n in names):
            config["n_model_layers"] = max(found) + 1
    return ck.checked_config(config, cfg_path), ck.read_tensors(directory, AUTOENCODER)


def lens(directory: Path) -> Any:
    """The tuned lens saved in a training-module checkpoint (`lens.layer_translators.<i>.*`,
    translator i applied to block i's output, as the original code did), or None."""
    if not ck.has_prefix(directory, LENS):
        return None
    from mlsae_core.lens import TunedLens

    state = ck.read_tensors(directory, LENS)
    return TunedLens.from_state_dict(
        state, prefix="layer_translators.", index_offset=0, where=directory / WEIGHTS_NAME
    )


def transformer_state(directory: Path) -> dict[str, torch.Tensor] | None:
    """The transformer's state dict saved in a training-module checkpoint (None if none)."""
    if not ck.has_prefix(directory, TRANSFORMER):
        return None
    return ck.read_tensors(directory, TRANSFORMER)
