"""Prompt heatmap (docs/method.md §5): at which layers do a prompt's latents fire?

For one prompt: encode every layer's residual stream, sum (or max) each latent's activation
over the prompt's tokens per layer, drop latents whose largest per-layer value is below the
threshold, normalise each remaining latent over layers and sort latents by their mean layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlsae_core.analysis.examples import token_strings
from mlsae_core.config import DEFAULT_PROMPT, SAEConfig

if TYPE_CHECKING:
    from mlsae_core.sae import MLSAE


@dataclass
class PromptHeatmap:
    prompt: str
    layers: list[int]  # block ids, the matrix rows
    tokens: list[str]  # readable prompt tokens (specials excluded)
    latents: torch.Tensor  # [m] latent ids, the matrix columns, sorted by layer_mean
    matrix: torch.Tensor  # [L, m] float64 each column sums to 1
    layer_mean: torch.Tensor  # [m] sum_l l * matrix[l]
    raw: torch.Tensor  # [L, m] float64 the un-normalised per-layer sums (or maxima)


@torch.no_grad()
def prompt_heatmap(
    transformer: Any,
    sae: MLSAE,
    layers: Sequence[int],
    prompt: str = DEFAULT_PROMPT,
    threshold: float = SAEConfig.dead_threshold,
    reduce: str = "sum",
    lens: Any = None,
) -> PromptHeatmap:
    """[layers x latents] distribution of each latent's activation on `prompt` (through the
    run's tuned `lens`, if it was trained with one).

    reduce="sum" follows docs/method.md §5; "max" is the reference's figure (max over tokens).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    layers = [int(x) for x in layers]
    tok = transformer.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt has no tokens")
    tokens = torch.tensor([ids], dtype=torch.long)  # [1, P]
    special = torch.tensor(sorted(transformer.special_token_ids), dtype=torch.long)
    keep = ~torch.isin(tokens[0], special)  # [P]
    device = next(sae.parameters()).device
    acts = transformer.activations(tokens, layers)[:, 0, keep].float().to(device)  # [L, P', d]
    if lens is not None:
        acts = lens.transform(acts, layers)
    topk = sae(acts).topk
    values = topk.values.double().cpu().flatten(1)  # [L, P'*k]
    indices = topk.indices.cpu().flatten(1)
    per_layer = torch.zeros(len(layers), sae.n_latents, dtype=torch.float64)  # [L, n]
    if reduce == "sum":
        per_layer.scatter_add_(1, indices, values)
    else:
        per_layer.scatter_reduce_(1, indices, values, reduce="amax", include_self=True)
    alive = (per_layer.max(0).values >= threshold).nonzero().squeeze(-1)  # [m]
    raw = per_layer[:, alive]  # [L, m]
    matrix = raw / raw.sum(0, keepdim=True)
    ell = torch.arange(len(layers), dtype=torch.float64)[:, None]
    layer_mean = (ell * matrix).sum(0)
    order = torch.sort(layer_mean, stable=True).indices
    kept_ids = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
    strings = token_strings(tok, kept_ids)
    return PromptHeatmap(
        prompt=prompt,
        layers=layers,
        tokens=[strings[i] for i in kept_ids],
        latents=alive[order],
        matrix=matrix[:, order],
        layer_mean=layer_mean[order],
        raw=raw[:, order],
    )
