"""mlsae_core: Multi-Layer Sparse Autoencoders over any HuggingFace causal LM.

The public API is re-exported lazily, so `import mlsae_core` stays cheap (Dagster's code
server imports this package at start-up; torch and transformers load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MLSAE": "mlsae_core.sae",
    "TopK": "mlsae_core.sae",
    "AutoencoderOutput": "mlsae_core.sae",
    "CheckpointError": "mlsae_core.checkpoint",
    "standardize": "mlsae_core.sae",
    "geometric_median": "mlsae_core.sae",
    "SAEConfig": "mlsae_core.config",
    "DataConfig": "mlsae_core.config",
    "TrainConfig": "mlsae_core.config",
    "EvalConfig": "mlsae_core.config",
    "RunSpec": "mlsae_core.config",
    "StorageLayout": "mlsae_core.layout",
    "RunLayout": "mlsae_core.layout",
    "ConfigError": "mlsae_core.config",
    "Transformer": "mlsae_core.transformer",
    "UnsupportedModelError": "mlsae_core.transformer",
    "TokenChunks": "mlsae_core.chunks",
    "DataError": "mlsae_core.documents",
    "load_documents": "mlsae_core.documents",
    "tokenize_chunks": "mlsae_core.chunks",
    "train": "mlsae_core.train",
    "TrainingDiverged": "mlsae_core.train",
    "evaluate": "mlsae_core.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlsae_core' has no attribute {name!r}")
