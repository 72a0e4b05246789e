"""Analyses of trained MLSAEs (docs/method.md §5), re-exported lazily.

Collectors (`LayerDists`, `TokenLayerVariance`, `MaxExamples`) ride along one
`mlsae_core.evaluate.evaluate` pass; the geometry and prompt analyses take weights or a
transformer directly; `tables` turns every result into a Parquet-ready `pyarrow.Table`.
Importing this package stays cheap: torch loads when a name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LayerDists": "dists",
    "DistsResult": "dists",
    "RunningStats": "dists",
    "describe": "dists",
    "TokenLayerVariance": "variance",
    "VarianceResult": "variance",
    "MaxExamples": "examples",
    "ExamplesResult": "examples",
    "sae_row_encoder": "examples",
    "token_strings": "examples",
    "ResidCosSim": "geometry",
    "resid_cos_sim": "geometry",
    "transformer_batches": "geometry",
    "MaxCos": "geometry",
    "max_cos": "geometry",
    "mmcs": "geometry",
    "SimDistHistogram": "geometry",
    "decoder_sim_vs_layer_distance": "geometry",
    "EmbeddingSim": "geometry",
    "embedding_similarity": "geometry",
    "model_embeddings": "geometry",
    "top_cosine": "geometry",
    "PromptHeatmap": "prompts",
    "prompt_heatmap": "prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
