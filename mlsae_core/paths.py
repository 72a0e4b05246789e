"""Where mlsae keeps what it downloads or converts, so every entry point agrees."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The storage root: `$MLSAE_DATA_DIR`, else `data/` in the current directory."""
    return Path(os.environ.get("MLSAE_DATA_DIR", "data")).resolve()


def models_dir() -> Path:
    """Converted transformer models (e.g. the offline SmolLM2 as safetensors)."""
    return data_dir() / "models"


def sources_dir() -> Path:
    """Raw text sources such as the Brown corpus."""
    return data_dir() / "sources"
