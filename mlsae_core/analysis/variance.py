"""Token-level vs aggregate layer variance (the paper's "~100x" comparison).

Definitions (layer index l = 0..L-1 is the position in the SAE's layers list):

- a[l, t, j]: latent j's activation at layer l on token t, counted only when it fires
  (> dead_threshold; otherwise 0). The same N tokens are encoded at every layer, so entry
  [l, t] of every layer's top-k belongs to token t.
- Per (token, latent) pair with w[t, j] = sum_l a[l, t, j] > 0 (the latent fires at some
  layer of that token): q[l | t, j] = a[l, t, j] / w[t, j], its layer distribution at that
  token, with mean m[t, j] and variance v[t, j] = sum_l l^2 q - m^2.
- Token-level variance of latent j: V_tok[j] = sum_t w[t, j] v[t, j] / sum_t w[t, j], the
  activation-weighted expected variance for a single token.
- Aggregate variance of latent j: V_agg[j] = the variance of p[:, j] = sum_t a[:, t, j] /
  sum_{l,t} a[l, t, j] (exactly `DistsResult.layer_var`).
- Law of total variance: p[:, j] is the w-weighted mixture of the q[: | t, j], so
  V_agg[j] = V_tok[j] + (w-weighted variance over tokens of m[t, j]) >= V_tok[j]. The gap is
  how much a latent's layer moves from token to token.
- Per config: token_var_mean and aggregate_var_mean are unweighted means over live latents
  (ratio = aggregate / token); the `_weighted` versions weight latents by their total
  activation (ratio_weighted likewise); mean_layers_per_token is the mean over (token,
  latent) pairs of the number of layers at which the latent fires on that token.
- The original code's formula (`mlsae/analysis/variances.py` of tim-lawson/mlsae), the `orig_*`
  columns, over all N tokens and all n latents with q[l | t, j] = 0 where the latent does not
  fire on the token: var(x) = sum_l l^2 x - (sum_l l x)^2 applied to q itself
  (orig_exp_var_l_tf = mean over (t, j) of v[t, j], inactive pairs as 0), to the unnormalised
  token mean q[:, j] summed over t / N (orig_exp_var_l_f, mean over j) and to the mean over
  both (orig_var_l). The original averaged per batch; we take the whole test set as one batch,
  so the numbers do not depend on the batch split. docs/method.md §5 says what each measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlsae_core.analysis.dists import TopKCollector
from mlsae_core.analysis.tables import ORIGINAL_STATS


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


@dataclass
class VarianceResult:
    """Per-latent token-level and aggregate layer variances (NaN for dead latents)."""

    layers: list[int]
    token_var: torch.Tensor  # [n] V_tok
    aggregate_var: torch.Tensor  # [n] V_agg
    weight: torch.Tensor  # [n] total activation sum_{l,t} a
    pairs: torch.Tensor  # [n] number of (token, latent) pairs where it fires
    layers_per_pair: torch.Tensor  # [n] sum over pairs of the layers it fires at
    n_tokens: int
    orig: torch.Tensor  # [3, n] sums over tokens of m[t, j], E_q[l^2], v[t, j] (original formula)

    @property
    def live(self) -> torch.Tensor:
        return self.weight > 0

    def summary(self) -> dict[str, Any]:
        live = self.live
        tok, agg, w = self.token_var[live], self.aggregate_var[live], self.weight[live]
        n_live = int(live.sum())
        pairs = float(self.pairs.sum())

        tok_mean = float(tok.mean()) if n_live else math.nan
        agg_mean = float(agg.mean()) if n_live else math.nan
        tok_w = float((tok * w).sum() / w.sum()) if n_live else math.nan
        agg_w = float((agg * w).sum() / w.sum()) if n_live else math.nan
        return {
            "n_layers": len(self.layers),
            "n_live": n_live,
            "n_tokens": self.n_tokens,
            "token_var_mean": tok_mean,
            "aggregate_var_mean": agg_mean,
            "ratio": _ratio(agg_mean, tok_mean),
            "token_var_weighted": tok_w,
            "aggregate_var_weighted": agg_w,
            "ratio_weighted": _ratio(agg_w, tok_w),
            "mean_layers_per_token": float(self.layers_per_pair.sum()) / pairs
            if pairs
            else math.nan,
            **self.original_summary(),
        }

    def original_summary(self) -> dict[str, float]:
        """The original code's Metric.update/compute on one batch holding every test token."""
        n_tok, n_lat = self.n_tokens, self.orig.shape[1]
        if not n_tok:
            return dict.fromkeys(ORIGINAL_STATS, math.nan)
        m, e2, v = self.orig / n_tok  # [n] each: token means (inactive tokens count as 0)
        e_var_l_tf = float(v.sum()) / n_lat
        e_var_l_f = float((e2 - m.pow(2)).mean())
        var_l = float(e2.mean() - m.mean().pow(2))

        return {
            "orig_exp_var_l_tf": e_var_l_tf,
            "orig_exp_var_l_f": e_var_l_f,
            "orig_var_l": var_l,
            "orig_rel_var_f": _ratio(e_var_l_f, var_l),
            "orig_rel_var_t": _ratio(e_var_l_tf, e_var_l_f),
            "orig_ratio": _ratio(e_var_l_f, e_var_l_tf),
        }


class TokenLayerVariance(TopKCollector):
    """Collector for `evaluate`: per-token layer variance vs aggregate, per latent.

    Per batch the L*N*k top-k entries are grouped by (token, latent) with `torch.unique`;
    memory is O(L*N*k + n_latents), never [N, n_latents].
    """

    def __init__(self, n_latents: int, layers: Sequence[int], **kwargs: Any) -> None:
        super().__init__(n_latents, layers, **kwargs)
        f64 = torch.float64
        self.tok_w = torch.zeros(n_latents, dtype=f64)  # sum_t w[t, j]
        self.tok_wv = torch.zeros(n_latents, dtype=f64)  # sum_t w[t, j] v[t, j]
        self.pairs = torch.zeros(n_latents, dtype=f64)  # (token, latent) pairs
        self.layer_count = torch.zeros(n_latents, dtype=f64)  # sum over pairs of #layers
        self.agg = torch.zeros(3, n_latents, dtype=f64)  # sum a, sum l a, sum l^2 a
        self.orig = torch.zeros(3, n_latents, dtype=f64)  # sum_t m, E_q[l^2], v (original)

    @torch.no_grad()
    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values, indices: [L, N, k]; entry [l, t] is token t at layer index l."""
        n_layers, n_tok, k = values.shape
        if n_layers != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layers, got {tuple(values.shape)}")
        self.n_tokens += n_tok
        v = values.detach().double().cpu()
        i = indices.detach().cpu()
        ell = torch.arange(n_layers, dtype=torch.float64)[:, None, None].expand_as(v)
        tok = torch.arange(n_tok)[None, :, None].expand_as(i)
        fired = v > self.dead_threshold
        a, ell, tok, lat = v[fired], ell[fired], tok[fired], i[fired]  # [E] each
        if a.numel() == 0:
            return
        key = tok * self.n_latents + lat  # [E] one id per (token, latent)
        uniq, inv = torch.unique(key, return_inverse=True)
        sums = torch.zeros(4, uniq.numel(), dtype=torch.float64)  # [4, G]
        for row, val in enumerate((a, ell * a, ell.pow(2) * a, torch.ones_like(a))):
            sums[row].index_add_(0, inv, val)
        w, s1, s2, n_l = sums
        mean, second = s1 / w, s2 / w
        var = (second - mean.pow(2)).clamp_min(0.0)
        g_lat = uniq % self.n_latents  # [G]
        self.tok_w.index_add_(0, g_lat, w)
        self.tok_wv.index_add_(0, g_lat, w * var)
        self.pairs.index_add_(0, g_lat, torch.ones_like(w))
        self.layer_count.index_add_(0, g_lat, n_l)
        for row, val in enumerate((w, s1, s2)):
            self.agg[row].index_add_(0, g_lat, val)
        for row, val in enumerate((mean, second, second - mean.pow(2))):
            self.orig[row].index_add_(0, g_lat, val)

    def result(self) -> VarianceResult:
        w, s1, s2 = self.agg
        live = w > 0
        safe = w.clamp_min(1e-300)
        agg_mean = s1 / safe
        agg_var = (s2 / safe - agg_mean.pow(2)).clamp_min(0.0)
        tok_var = self.tok_wv / self.tok_w.clamp_min(1e-300)
        return VarianceResult(
            layers=self.layers,
            token_var=torch.where(live, tok_var, math.nan),
            aggregate_var=torch.where(live, agg_var, math.nan),
            weight=w.clone(),
            pairs=self.pairs.clone(),
            layers_per_pair=self.layer_count.clone(),
            n_tokens=self.n_tokens,
            orig=self.orig.clone(),
        )
