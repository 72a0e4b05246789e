"""The analysis of one prompt, computed once and then served from the cache.

One clean forward keeps every block output; the MLSAE encodes and reconstructs each of its
layers; the prompt's metrics are the evaluation's own (`metrics.ReconstructionMetrics`) over
the prompt's non-special tokens, so the explorer and `mlsae evaluate` cannot disagree on
what FVU, MSE or L0 mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlsae_core.explorer.cache import tensor_bytes
from mlsae_core.explorer.wire import finite
from mlsae_core.metrics import ReconstructionMetrics
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import CleanPass, Transformer

# The streaming variance sum ||x||^2 - ||sum x||^2 / n cancels to rounding noise when every
# token has the same vector (a repeated token in a causal model): below this fraction of
# sum ||x||^2 the prompt has no variance, and FVU is null as for a single token.
NO_VARIANCE = 1e-12


@dataclass
class PromptResult:
    """Everything derived from one prompt; P tokens, L = the SAE's layers."""

    prompt: str
    ids: list[int]
    tokens: list[str]  # readable text of each token
    special: torch.Tensor  # [P] bool BOS/EOS/PAD positions (excluded everywhere)
    clean: CleanPass  # hidden [n_model_layers, 1, P, d] + block kwargs
    values: torch.Tensor  # [L, P, k] float32 ReLU'd top-k values (0 at special positions)
    indices: torch.Tensor  # [L, P, k] int64
    recons: torch.Tensor  # [L, P, d] the SAE's reconstruction, in the model's own space
    scale: torch.Tensor  # [L, P] standardization std (1 without standardization)
    metrics: list[dict[str, Any]]

    @property
    def nbytes(self) -> int:
        """What the prompt cache charges for this result."""
        tensors = (self.clean.hidden, self.clean.block_kwargs, self.values, self.indices)
        held = tensor_bytes([*tensors, self.recons, self.scale])
        return held + 64 * len(self.ids) + 2 * len(self.prompt)


def prompt_metrics(
    layers: Sequence[int],
    x: torch.Tensor,
    recons: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    special: torch.Tensor,
    n_latents: int,
    dead_threshold: float,
) -> list[dict[str, Any]]:
    """Per SAE layer over the non-special tokens: FVU (also without position 0, and position
    0's share of the variance), MSE, L0, L1 (null where undefined).

    x, recons: [L, P, d]; values, indices: [L, P, k]; special: [P].
    """
    keep = ~special
    n = int(keep.sum())
    acc = ReconstructionMetrics(len(layers), n_latents, x.shape[-1], dead_threshold)
    first = (torch.arange(len(keep)) == 0)[keep]  # the prompt's position 0, if not special
    acc.update(x[:, keep], recons[:, keep], values[:, keep], indices[:, keep], first)
    got = acc.compute()
    varies = (acc.variance() > NO_VARIANCE * acc.total.x_sq).tolist()
    rest_varies = (acc.rest.variance() > NO_VARIANCE * acc.rest.x_sq).tolist()
    return [
        {
            "layer": layer,
            "fvu": finite(got["fvu"][i]) if n >= 2 and varies[i] else None,
            "fvu_nofirst": (
                finite(got["fvu_nofirst"][i]) if acc.rest.n >= 2 and rest_varies[i] else None
            ),
            "first_share": finite(got["first_share"][i]) if n >= 2 and varies[i] else None,
            "mse": finite(got["mse"][i]) if n else None,
            "l0": got["l0"][i] if n else None,
            "l1": got["l1"][i] if n else None,
        }
        for i, layer in enumerate(layers)
    ]


@torch.no_grad()
def analyse_prompt(
    transformer: Transformer,
    sae: MLSAE,
    layers: list[int],
    prompt: str,
    ids: list[int],
    tokens: list[str],
    lens: Any = None,
) -> PromptResult:
    """Run the model once on `ids` and the MLSAE on each of `layers` (block ids), through
    the run's tuned `lens` if it was trained with one (metrics in the lens's space, the
    reconstruction mapped back for splicing)."""
    device = next(sae.parameters()).device
    batch = torch.tensor([ids], dtype=torch.long)  # [1, P]
    special = torch.tensor([i in transformer.special_token_ids for i in ids])  # [P]
    clean = transformer.clean_pass(batch, with_logits=False)
    x = clean.hidden[layers, 0].to(device)  # [L, P, d]
    if lens is not None:
        x = lens.transform(x, layers)
    out = sae(x)
    keep = (~special).to(device)[None, :, None]  # [1, P, 1]
    values = torch.where(keep, out.topk.values, 0.0).float().cpu()  # [L, P, k]
    indices = out.topk.indices.cpu()
    recons = out.recons.float().cpu()  # [L, P, d]
    if out.stats is not None:
        scale = out.stats.std[..., 0].float().cpu()  # [L, P]
    else:
        scale = torch.ones(values.shape[:2])
    metrics = prompt_metrics(
        layers, x.cpu(), recons, values, indices, special, sae.n_latents, sae.dead_threshold
    )
    if lens is not None:
        recons = lens.inverse(recons.to(device), layers).cpu()
    return PromptResult(
        prompt, ids, tokens, special, clean, values, indices, recons, scale, metrics
    )
