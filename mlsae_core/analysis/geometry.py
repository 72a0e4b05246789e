"""Geometry of the residual stream and of SAE dictionaries (docs/method.md §5).

- Residual cosine similarity between adjacent layers, after removing each layer's mean
  (two passes over any source of [L, N, d] activation batches), plus activation norms.
- MMCS (mean max cosine similarity) of decoder columns, within one dictionary and between
  two, in column blocks so n = 32k+ latents fit in memory.
- Decoder similarity vs layer distance: do latents with nearby layer means point in similar
  directions? A 2-D histogram over (sampled) pairs of live latents.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlsae_core.analysis.dists import RunningStats, describe

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

ActivationSource = Callable[[], Iterable[torch.Tensor]] | Sequence[torch.Tensor]


# ----- residual stream ---------------------------------------------------------------------
@dataclass
class ResidCosSim:
    """Per layer: stats of ||x_l||, and of cos(x_l - mean_l, x_{l+1} - mean_{l+1})."""

    layers: list[int]  # block ids; pair i is (layers[i], layers[i + 1])
    cos: dict[str, torch.Tensor]  # mean/var/std/sem/n: [L - 1] float64
    norm: dict[str, torch.Tensor]  # mean/var/std/sem/n: [L] float64
    layer_mean: torch.Tensor  # [L, d] float64 per-layer mean activation (pass 1)
    n_tokens: int


def _batches(source: ActivationSource) -> Iterable[torch.Tensor]:
    if callable(source):
        return source()
    if isinstance(source, Iterator):
        raise TypeError("pass a re-iterable source (list or callable): two passes are needed")
    return source


def transformer_batches(
    transformer: Any,
    tokens: torch.Tensor,
    masks: torch.Tensor,
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
) -> Callable[[], Iterator[torch.Tensor]]:
    """A source of [L, N, d] block outputs at counted positions, re-runnable for each pass."""
    layers = list(range(transformer.n_layers)) if layers is None else list(layers)

    def gen() -> Iterator[torch.Tensor]:
        for s in range(0, tokens.shape[0], batch_size):
            toks = tokens[s : s + batch_size]
            acts = transformer.activations(toks, layers)  # [L, B, P, d]
            yield acts[:, masks[s : s + batch_size].to(acts.device)].float().cpu()

    return gen


@torch.no_grad()
def resid_cos_sim(source: ActivationSource, layers: Sequence[int] | None = None) -> ResidCosSim:
    """Two passes: per-layer means, then cosine of centred adjacent-layer vectors per token."""
    sums: torch.Tensor | None = None
    norms: RunningStats | None = None
    n = 0
    for x in _batches(source):  # [L, N, d]
        x64 = x.double().cpu()
        if sums is None:
            sums = torch.zeros(x64.shape[0], x64.shape[-1], dtype=torch.float64)
            norms = RunningStats((x64.shape[0],))
        sums += x64.sum(1)
        norms.update(x64.norm(dim=-1), dim=1)
        n += x64.shape[1]
    if sums is None or norms is None or n == 0:
        raise ValueError("no activations: the source yielded no tokens")
    mean = sums / n  # [L, d]
    cos = RunningStats((mean.shape[0] - 1,))
    for x in _batches(source):
        xc = x.double().cpu() - mean[:, None, :]  # [L, N, d]
        c = torch.nn.functional.cosine_similarity(xc[:-1], xc[1:], dim=-1, eps=1e-12)
        cos.update(c, dim=1)  # [L - 1, N]
    n_layers = mean.shape[0]
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    return ResidCosSim(layers, cos.result(), norms.result(), mean, n)


# ----- dictionaries ------------------------------------------------------------------------
def _unit_columns(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = w.detach().to(dtype)
    return w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cos(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    chunk_size: int = 2048,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """For each column of a [d, n_A], max cosine to any column of b [d, n_B].

    b=None compares a with itself, excluding each column's own index (MMCS within one
    dictionary). Memory is one [chunk_size, n_B] block at a time.
    """
    ua = _unit_columns(a, dtype)  # [d, n_A]
    same = b is None
    ub = ua if same else _unit_columns(b, dtype)  # [d, n_B]
    if ua.shape[0] != ub.shape[0]:
        raise ValueError(f"dictionaries live in different spaces: d={ua.shape[0]} vs {ub.shape[0]}")
    if same and ua.shape[1] < 2:
        raise ValueError("MMCS within a dictionary needs at least two columns")
    vals = []
    for s in range(0, ua.shape[1], chunk_size):
        sims = ua[:, s : s + chunk_size].t() @ ub  # [c, n_B]
        if same:
            r = torch.arange(sims.shape[0])
            sims[r, r + s] = -math.inf
        vals.append(sims.amax(dim=1))
    return torch.cat(vals)


def mmcs(decoder: torch.Tensor, other: torch.Tensor | None = None, **kw: Any) -> dict[str, float]:
    """mean/var/std/sem of max cosine similarity of decoder [d, n] columns (to `other`)."""
    return describe(max_cos(decoder, other, **kw))


@dataclass
class SimDistHistogram:
    """2-D histogram of decoder cosine similarity vs |layer_mean_i - layer_mean_j|."""

    counts: np.ndarray  # [n_dist_bins, n_cos_bins]
    dist_edges: np.ndarray  # [n_dist_bins + 1]
    cos_edges: np.ndarray  # [n_cos_bins + 1]
    sampled: bool
    mean_cos_by_dist: np.ndarray  # [n_dist_bins] mean cosine per distance bin (NaN if empty)


@torch.no_grad()
def decoder_sim_vs_layer_distance(
    decoder: torch.Tensor,
    layer_mean: torch.Tensor,
    n_layers: int,
    max_pairs: int = 1_000_000,
    dist_bins: int = 30,
    cos_bins: int = 50,
    seed: int = 0,
) -> SimDistHistogram:
    """Pairs of latents with finite layer_mean (live): all pairs if few, else `max_pairs`
    uniformly sampled pairs i != j (seeded, with replacement)."""
    import numpy as np

    live = torch.isfinite(layer_mean).nonzero().squeeze(-1)  # [m]
    m = int(live.numel())
    if m < 2:
        raise ValueError("need at least two live latents")
    sampled = m * (m - 1) // 2 > max_pairs
    if sampled:
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, m, (max_pairs,), generator=g)
        j = (i + torch.randint(1, m, (max_pairs,), generator=g)) % m  # j != i
    else:
        i, j = torch.triu_indices(m, m, offset=1)
    w = _unit_columns(decoder, torch.float64)[:, live]  # [d, m]
    cos = torch.cat(
        [(w[:, i[s : s + 65536]] * w[:, j[s : s + 65536]]).sum(0) for s in range(0, len(i), 65536)]
    ).numpy()
    lm = layer_mean.double()[live]
    dist = (lm[i] - lm[j]).abs().numpy()
    hi = float(max(n_layers - 1, 1))
    counts, dist_edges, cos_edges = np.histogram2d(
        dist, cos, bins=[dist_bins, cos_bins], range=[[0.0, hi], [-1.0, 1.0]]
    )
    which = np.clip(np.digitize(dist, dist_edges) - 1, 0, dist_bins - 1)
    sums = np.bincount(which, weights=cos, minlength=dist_bins)
    ns = np.bincount(which, minlength=dist_bins)
    mean_by = np.where(ns > 0, sums / np.maximum(ns, 1), np.nan)
    return SimDistHistogram(counts, dist_edges, cos_edges, sampled, mean_by)
