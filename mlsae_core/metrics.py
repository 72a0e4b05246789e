"""Streaming per-layer metrics (docs/method.md §4), exact over any batch split.

Every metric is a ratio of sums accumulated in float64, so streaming over batches gives the
same number as one pass over all tokens (not a mean of per-batch ratios).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mlsae_core.config import SAEConfig
from mlsae_core.sae import STD_EPS, standardize

METRIC_COLUMNS = (
    "mse",
    "fvu",
    "fvu_nofirst",
    "fvu_standardized",
    "first_share",
    "l0",
    "l1",
    "dead",
    "dce",
    "kl",
    "logit_mse",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "loss_recovered",
)


@dataclass
class FVUSums:
    """sum ||r - x||^2, sum x and sum ||x||^2 per layer over n vectors: an FVU, streamed."""

    n_layers: int
    d: int
    n: int = 0
    sq_err: torch.Tensor = field(init=False)  # [L]
    x_sum: torch.Tensor = field(init=False)  # [L, d]
    x_sq: torch.Tensor = field(init=False)  # [L]

    def __post_init__(self) -> None:
        self.sq_err = torch.zeros(self.n_layers, dtype=torch.float64)
        self.x_sum = torch.zeros(self.n_layers, self.d, dtype=torch.float64)
        self.x_sq = torch.zeros(self.n_layers, dtype=torch.float64)

    def add(self, x64: torch.Tensor, r64: torch.Tensor) -> None:
        """x64, r64: [L, N, d] float64."""
        self.n += x64.shape[1]
        self.sq_err += (r64 - x64).pow(2).sum(dim=(1, 2))
        self.x_sum += x64.sum(dim=1)
        self.x_sq += x64.pow(2).sum(dim=(1, 2))

    def variance(self) -> torch.Tensor:
        """[L] sum ||x - xbar_l||^2 about these vectors' own mean: FVU's denominator."""
        return self.x_sq - self.x_sum.pow(2).sum(-1) / max(self.n, 1)

    def fvu(self) -> torch.Tensor:
        """[L] sum ||r - x||^2 / variance(); NaN over no vectors."""
        if not self.n:
            return torch.full((self.n_layers,), math.nan, dtype=torch.float64)
        return self.sq_err / self.variance().clamp_min(1e-300)


@dataclass
class ReconstructionMetrics:
    """MSE, FVU, L0, L1 and dead fraction per layer, accumulated over batches; FVU also over
    the positions after each sequence's first (`fvu_nofirst`), in the per-vector standardized
    space (`fvu_standardized`), and the first positions' share of the variance (`first_share`)."""

    n_layers: int
    n_latents: int
    d: int
    dead_threshold: float = SAEConfig.dead_threshold
    total: FVUSums = field(init=False)  # every position
    rest: FVUSums = field(init=False)  # positions other than a sequence's first
    std: FVUSums = field(init=False)  # every position, x and r standardized by x's stats
    l0: torch.Tensor = field(init=False)  # [L] sum of active counts
    l1: torch.Tensor = field(init=False)  # [L] sum of latent values
    fired: torch.Tensor = field(init=False)  # [L, n] bool

    def __post_init__(self) -> None:
        self.total, self.rest, self.std = (FVUSums(self.n_layers, self.d) for _ in range(3))
        self.l0 = torch.zeros(self.n_layers, dtype=torch.float64)
        self.l1 = torch.zeros(self.n_layers, dtype=torch.float64)
        self.fired = torch.zeros(self.n_layers, self.n_latents, dtype=torch.bool)

    @property
    def n_tokens(self) -> int:
        return self.total.n

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        recons: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        first: torch.Tensor | None = None,
    ) -> None:
        """x, recons: [L, N, d]; values, indices: [L, N, k] (ReLU'd TopK); first: [N] bool,
        the positions that are position 0 of their sequence (None: none are)."""
        x64, r64 = x.double().cpu(), recons.double().cpu()
        values, indices = values.cpu(), indices.cpu()
        self.total.add(x64, r64)
        rest = slice(None) if first is None else ~first.cpu()
        self.rest.add(x64[:, rest], r64[:, rest])
        xs, (mu, sd) = standardize(x64)  # the map the SAE applies to its inputs
        self.std.add(xs, (r64 - mu) / (sd + STD_EPS))
        active = values > self.dead_threshold
        self.l0 += active.sum(dim=(1, 2)).double()
        self.l1 += values.double().sum(dim=(1, 2))
        for layer in range(self.n_layers):
            self.fired[layer, indices[layer][active[layer]]] = True

    def variance(self) -> torch.Tensor:
        """[L] sum ||x - xbar_l||^2, FVU's denominator (callers that must tell "no variance",
        e.g. the explorer's one-prompt metrics, compare it with total.x_sq)."""
        return self.total.variance()

    def first_share(self) -> torch.Tensor:
        """[L] sum over first positions of ||x - xbar_l||^2 / sum over all (xbar_l: all)."""
        t, r = self.total, self.rest
        mean = t.x_sum / max(t.n, 1)  # [L, d]
        rest_var = r.x_sq - 2 * (mean * r.x_sum).sum(-1) + r.n * mean.pow(2).sum(-1)
        var = t.variance()
        return (var - rest_var) / var.clamp_min(1e-300)

    def compute(self) -> dict[str, list[float]]:
        n = max(self.n_tokens, 1)
        return {
            "mse": (self.total.sq_err / (n * self.d)).tolist(),
            "fvu": self.total.fvu().tolist(),
            "fvu_nofirst": self.rest.fvu().tolist(),
            "fvu_standardized": self.std.fvu().tolist(),
            "first_share": self.first_share().tolist(),
            "l0": (self.l0 / n).tolist(),
            "l1": (self.l1 / n).tolist(),
            "dead": (~self.fired).double().mean(-1).tolist(),
        }

    def dead_fraction(self) -> float:
        """Latents that never fired at any layer."""
        return float((~self.fired.any(0)).double().mean())


@dataclass
class CleanLogitStats:
    """Per-position clean quantities kept for one batch while every layer is spliced."""

    target_log_probs: torch.Tensor  # [M] float64 clean log-probability of the next token
    probs: torch.Tensor  # [M, V] float32 clean softmax
    mass: torch.Tensor  # [M] float64 sum_v p (1 up to float32 rounding)
    hidden: torch.Tensor  # [M, d] float64 final-normed clean hidden states


@torch.no_grad()
def unembedding_gram(weight: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """[d, d] float64 W^T W for an unembedding W [V, d]: float32 chunks summed in float64."""
    w = weight.detach()
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
    for a in range(0, w.shape[0], chunk_rows):
        c = w[a : a + chunk_rows].float()
        gram += (c.t() @ c).double()
    return gram


# Above this, e^x of a centred logit difference could overflow float32 (e^88).
_PHI_MAX = 60.0


def _phi(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 - x (>= 0, ~x^2/2 near 0), in place on a float32 temporary."""
    return torch.expm1(x).sub_(x)


@dataclass
class SpliceMetrics:
    """dCE, KL(clean || spliced), logit MSE, zero-ablation CE and loss recovered per layer."""

    n_layers: int
    n_positions: int = 0
    vocab: int = 0
    ce_clean: float = 0.0
    ce_spliced: torch.Tensor = field(init=False)
    ce_zero: torch.Tensor = field(init=False)
    kl: torch.Tensor = field(init=False)
    logit_sq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        for name in ("ce_spliced", "ce_zero", "kl", "logit_sq"):
            setattr(self, name, torch.zeros(self.n_layers, dtype=torch.float64))

    @torch.no_grad()
    def update_clean(self, clean_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """clean_logits: [M, V] at counted positions; targets: [M] next tokens."""
        self.vocab = clean_logits.shape[-1]
        self.n_positions += targets.numel()
        lp = torch.log_softmax(clean_logits.double(), -1)
        self.ce_clean += float(-lp.gather(-1, targets[:, None]).sum())

    @torch.no_grad()
    def update_layer(
        self,
        layer: int,
        clean_logits: torch.Tensor,
        spliced_logits: torch.Tensor,
        targets: torch.Tensor,
        zero_log_probs: torch.Tensor,
    ) -> None:
        """All [M, V] except targets [M] and zero_log_probs [V] (the input-independent ablation)."""
        lp_c = torch.log_softmax(clean_logits.double(), -1)
        lp_s = torch.log_softmax(spliced_logits.double(), -1)
        self.ce_spliced[layer] += float(-lp_s.gather(-1, targets[:, None]).sum())
        self.kl[layer] += float((lp_c.exp() * (lp_c - lp_s)).sum())
        self.logit_sq[layer] += float(
            (clean_logits.double() - spliced_logits.double()).pow(2).sum()
        )
        self.ce_zero[layer] += float(-zero_log_probs.double()[targets].sum())

    # ----- the fast path: float32 chunks, float64 sums (used by `evaluate`) -----------------
    # update_clean/update_layer above are the plain float64 path and the oracle for these.
    # Per position, with clean probabilities p and the spliced logits written as
    # z_s = z_c + delta (delta from the small difference of final-normed states, see
    # Transformer.logit_difference), mean = E_p[delta] and delta' = delta - mean:
    #   KL(clean || spliced) = log E_p[e^delta'] = log1p(E_p[e^delta' - 1 - delta'])
    #   CE_s = -log p[t] + mean + KL - delta[t]
    #   sum_v delta^2 = dh^T (W^T W) dh (the unembedding is linear; a bias cancels).
    # KL is a sum of non-negative second-order terms, so nothing cancels: it keeps its
    # relative precision even for near-perfect reconstructions (KL ~ 1e-6), and a rounding
    # error in delta (a bfloat16 GEMM) or in `mean` moves it only to second order. A layer
    # costs one GEMM of dh plus a few passes over [rows, V] chunks that stay near the cache;
    # no float64 [M, V] tensor is ever built.
    @torch.no_grad()
    def update_clean_chunked(
        self,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        hidden: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int = 128,
    ) -> CleanLogitStats:
        """hidden: [M, d] final-normed clean states; logits_fn maps rows of it to [rows, V]."""
        n = hidden.shape[0]
        probs: torch.Tensor | None = None  # [M, V], allocated once the vocabulary is known
        mass = torch.empty(n, dtype=torch.float64, device=hidden.device)
        lp_t = torch.empty(n, dtype=torch.float64, device=hidden.device)
        for a in range(0, n, chunk_rows):
            sl = slice(a, a + chunk_rows)
            logits = logits_fn(hidden[sl]).float()
            if probs is None:
                self.vocab = logits.shape[-1]
                probs = torch.empty(n, self.vocab, dtype=torch.float32, device=hidden.device)
            lse = torch.logsumexp(logits, -1)
            lp_t[sl] = logits.gather(-1, targets[sl, None]).squeeze(-1).double() - lse.double()
            p = torch.exp(logits.sub_(lse[:, None]), out=probs[sl])
            mass[sl] = p.sum(-1).double()
        self.n_positions += targets.numel()
        self.ce_clean += float(-lp_t.sum())
        assert probs is not None, "no positions"
        return CleanLogitStats(lp_t, probs, mass, hidden.double())

    @torch.no_grad()
    def update_layer_chunked(
        self,
        layer: int,
        clean: CleanLogitStats,
        delta_fn: Callable[[torch.Tensor], torch.Tensor],
        hidden: torch.Tensor,
        targets: torch.Tensor,
        zero_log_probs: torch.Tensor,
        gram: torch.Tensor,
        chunk_rows: int = 128,
    ) -> None:
        """hidden: [M, d] final-normed spliced states; gram: [d, d] float64 W^T W.

        delta_fn maps rows of dh = hidden - clean hidden (float32) to their float32 logit
        differences z_s - z_c (`Transformer.logit_difference`, float32 or bfloat16 GEMM).
        """
        ce = torch.zeros((), dtype=torch.float64, device=hidden.device)
        kl = torch.zeros((), dtype=torch.float64, device=hidden.device)
        dh = hidden.double() - clean.hidden  # [M, d]
        dh32 = dh.float()
        for a in range(0, hidden.shape[0], chunk_rows):
            sl = slice(a, a + chunk_rows)
            p, mass = clean.probs[sl], clean.mass[sl]
            delta = delta_fn(dh32[sl])  # [rows, V] float32
            d_t = delta.gather(-1, targets[sl, None]).squeeze(-1).double()
            mean = torch.linalg.vecdot(p, delta).double() / mass  # E_p[delta]
            centred = delta.sub_(mean.float()[:, None])  # delta', E_p[delta'] = 0
            kl_rows = torch.log1p(torch.linalg.vecdot(p, _phi(centred)).double() / mass)
            big = centred.amax(-1) > _PHI_MAX  # e^delta' could overflow: max-shifted form
            if bool(big.any()):
                m = centred[big].amax(-1, keepdim=True)
                shifted = torch.linalg.vecdot(p[big], (centred[big] - m).exp_()).double()
                kl_rows[big] = m.squeeze(-1).double() + torch.log(shifted / mass[big])
            kl += kl_rows.sum()
            ce += (mean + kl_rows - clean.target_log_probs[sl] - d_t).sum()
        self.ce_spliced[layer] += float(ce)
        self.kl[layer] += float(kl)
        self.logit_sq[layer] += float(torch.linalg.vecdot(dh @ gram, dh).sum())
        self.ce_zero[layer] += float(-zero_log_probs.double()[targets].sum())

    def compute(self) -> dict[str, list[float]]:
        n = max(self.n_positions, 1)
        ce_clean = self.ce_clean / n
        ce_s = self.ce_spliced / n
        ce_z = self.ce_zero / n
        denom = ce_z - ce_clean
        recovered = torch.where(denom.abs() > 1e-12, (ce_z - ce_s) / denom, torch.nan)
        return {
            "dce": (ce_s - ce_clean).tolist(),
            "kl": (self.kl / n).tolist(),
            "logit_mse": (self.logit_sq / (n * max(self.vocab, 1))).tolist(),
            "ce_clean": [ce_clean] * self.n_layers,
            "ce_spliced": ce_s.tolist(),
            "ce_zero": ce_z.tolist(),
            "loss_recovered": recovered.tolist(),
        }


def metrics_rows(
    layers: Sequence[int],
    recon: ReconstructionMetrics,
    splice: SpliceMetrics | None,
) -> list[dict[str, Any]]:
    """One row per layer plus one whose `layer` is 'avg' (mean over layers; dead over all)."""
    values = recon.compute()
    if splice is not None:
        values.update(splice.compute())
    rows: list[dict[str, Any]] = [
        {"layer": str(layer)}
        | {c: float(values[c][i]) if c in values else math.nan for c in METRIC_COLUMNS}
        for i, layer in enumerate(layers)
    ]
    avg = {c: float(sum(r[c] for r in rows) / len(rows)) for c in METRIC_COLUMNS}
    return [*rows, {"layer": "avg", **avg, "dead": recon.dead_fraction()}]
