"""Latent distributions over layers ("dists", docs/method.md §5): where does each latent fire?

For an SAE over layers `layers` (index l = 0..L-1 is the position in that list, the actual
block ids are kept alongside), a latent j that fires (value > dead_threshold) at layer l on a
token adds 1 to counts[l, j] and its value to totals[l, j]. Values at or below the threshold
contribute to neither, so a latent with no count has no total (counts and totals agree on
which latents are live). p[:, j] = totals[:, j] / sum_l totals[l, j] is the latent's
activation-weighted distribution over layers, and its mean, variance and std are the paper's
layer statistics. Accumulation is float64 scatter-add over the top-k entries: memory is
O(L * n_latents) whatever the number of tokens, never a dense [tokens, n_latents] tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mlsae_core.config import SAEConfig

if TYPE_CHECKING:
    import numpy as np

    from mlsae_core.evaluate import EvalBatch


def describe(x: torch.Tensor) -> dict[str, float]:
    """mean, var (Bessel, n-1), std, sem = std / sqrt(n) and n of a 1-D sample, in float64.

    The reference reported these four numbers per config; var/std are NaN when n < 2.
    """
    x = x.detach().double().flatten()
    n = int(x.numel())
    if n == 0:
        return {"mean": math.nan, "var": math.nan, "std": math.nan, "sem": math.nan, "n": 0}
    mean = float(x.mean())
    var = float(x.var(unbiased=True)) if n > 1 else math.nan
    std = math.sqrt(var) if n > 1 else math.nan
    return {"mean": mean, "var": var, "std": std, "sem": std / math.sqrt(n), "n": n}


@dataclass
class RunningStats:
    """Streaming mean/var of many series at once (Chan et al.'s parallel merge, float64).

    Exact up to rounding for any batch split, without the cancellation of sum/sum-of-squares.
    """

    shape: tuple[int, ...] = ()
    n: torch.Tensor = field(init=False)  # [*shape] observations seen
    mean: torch.Tensor = field(init=False)  # [*shape]
    m2: torch.Tensor = field(init=False)  # [*shape] sum of squared deviations

    def __post_init__(self) -> None:
        self.n = torch.zeros(self.shape, dtype=torch.float64)
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.m2 = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, x: torch.Tensor, dim: int = -1) -> None:
        """Add the observations of x along `dim` (the other dims must match `shape`)."""
        x = x.detach().double().cpu()
        nb = x.shape[dim]
        if nb == 0:
            return
        mb = x.mean(dim)
        m2b = (x - mb.unsqueeze(dim)).pow(2).sum(dim)
        n_tot = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n_tot
        self.m2 = self.m2 + m2b + delta.pow(2) * self.n * nb / n_tot
        self.n = n_tot

    def result(self) -> dict[str, torch.Tensor]:
        """mean, var (n-1), std, sem as float64 tensors of `shape` (NaN where n < 2)."""
        nan = torch.full_like(self.n, math.nan)
        var = torch.where(self.n > 1, self.m2 / (self.n - 1).clamp_min(1), nan)
        std = var.sqrt()
        mean = torch.where(self.n > 0, self.mean, nan)
        return {"mean": mean, "var": var, "std": std, "sem": std / self.n.sqrt(), "n": self.n}


@dataclass
class DistsResult:
    """Per-latent layer distributions. Dead latents (total 0) have NaN p and statistics."""

    layers: list[int]  # actual block ids of the SAE's layers (index l -> layers[l])
    counts: torch.Tensor  # [L, n] float64 tokens where latent j fired at layer l
    totals: torch.Tensor  # [L, n] float64 sum of its values there
    n_tokens: int  # tokens seen (per layer)
    p: torch.Tensor = field(init=False)  # [L, n] totals / sum_l totals
    layer_mean: torch.Tensor = field(init=False)  # [n] sum_l l p
    layer_var: torch.Tensor = field(init=False)  # [n] sum_l l^2 p - mean^2 (clamped >= 0)
    layer_std: torch.Tensor = field(init=False)  # [n]
    count: torch.Tensor = field(init=False)  # [n] sum_l counts
    total: torch.Tensor = field(init=False)  # [n] sum_l totals
    n_layers_active: torch.Tensor = field(init=False)  # [n] int64 layers with count > 0
    live: torch.Tensor = field(init=False)  # [n] bool total > 0

    def __post_init__(self) -> None:
        n_layers = self.counts.shape[0]
        ell = torch.arange(n_layers, dtype=torch.float64)[:, None]  # [L, 1]
        self.count = self.counts.sum(0)
        self.total = self.totals.sum(0)
        self.live = self.total > 0
        self.p = torch.where(self.live, self.totals / self.total.clamp_min(1e-300), math.nan)
        self.layer_mean = (ell * self.p).sum(0)
        second = (ell.pow(2) * self.p).sum(0)
        self.layer_var = (second - self.layer_mean.pow(2)).clamp_min(0.0)
        self.layer_var = torch.where(self.live, self.layer_var, math.nan)
        self.layer_std = self.layer_var.sqrt()
        self.n_layers_active = (self.counts > 0).sum(0)

    @property
    def n_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.counts.shape[1])

    def summary(self) -> dict[str, Any]:
        """mean/var/std/sem of layer_std over live latents, and of layer_std / n_layers (*_rel).

        The `_rel` numbers compare models with different depths (the reference's columns).
        """
        std = self.layer_std[self.live]
        stats, rel = describe(std), describe(std / self.n_layers)
        return {
            "n_layers": self.n_layers,
            "n_latents": self.n_latents,
            "n_live": int(self.live.sum()),
            "n_tokens": self.n_tokens,
            **{k: stats[k] for k in ("mean", "var", "std", "sem")},
            **{f"{k}_rel": rel[k] for k in ("mean", "var", "std", "sem")},
        }

    def histogram(self, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """(counts [bins], edges [bins + 1]) of layer_mean over live latents on [0, L-1]."""
        import numpy as np

        hi = max(self.n_layers - 1, 1)
        means = self.layer_mean[self.live].numpy()
        return np.histogram(means, bins=bins, range=(0.0, float(hi)))

    def order(self) -> torch.Tensor:
        """Live latent ids sorted by layer_mean (ties by id): the heatmap's column order."""
        live = self.live.nonzero().squeeze(-1)
        key = self.layer_mean[live]
        return live[torch.sort(key, stable=True).indices]


class TopKCollector:
    """Base of the collectors `evaluate` feeds: each reads every batch's top-k at the SAE's
    layers (in `add(values, indices)`, [L, N, k]), counting a latent only where it fires
    (value > dead_threshold)."""

    def __init__(
        self,
        n_latents: int,
        layers: Sequence[int],
        dead_threshold: float = SAEConfig.dead_threshold,
    ) -> None:
        self.layers = [int(x) for x in layers]
        self.n_latents = n_latents
        self.dead_threshold = dead_threshold
        self.n_tokens = 0

    def check_layers(self, batch: EvalBatch) -> None:
        if list(batch.layers) != self.layers:
            raise ValueError(f"batch layers {batch.layers} != collector layers {self.layers}")

    def update(self, batch: EvalBatch) -> None:
        self.check_layers(batch)
        self.add(batch.topk.values, batch.topk.indices)


class LayerDists(TopKCollector):
    """Collector for `evaluate`: accumulates counts and totals per (layer, latent)."""

    def __init__(self, n_latents: int, layers: Sequence[int], **kwargs: Any) -> None:
        super().__init__(n_latents, layers, **kwargs)
        n_layers = len(self.layers)
        self.counts = torch.zeros(n_layers, n_latents, dtype=torch.float64)  # [L, n]
        self.totals = torch.zeros(n_layers, n_latents, dtype=torch.float64)  # [L, n]

    @torch.no_grad()
    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values, indices: [L, N, k] ReLU'd top-k of the same N tokens at every layer."""
        n_layers = len(self.layers)
        if values.shape[0] != n_layers:
            raise ValueError(f"expected {n_layers} layers, got values of shape {values.shape}")
        self.n_tokens += int(values.shape[1])
        v = values.detach().double().cpu().reshape(n_layers, -1)  # [L, N*k]
        i = indices.detach().cpu().reshape(n_layers, -1)  # [L, N*k]
        fired = v > self.dead_threshold
        self.counts.scatter_add_(1, i, fired.double())
        self.totals.scatter_add_(1, i, torch.where(fired, v, 0.0))

    def result(self) -> DistsResult:
        return DistsResult(self.layers, self.counts.clone(), self.totals.clone(), self.n_tokens)
