"""The multi-layer sparse autoencoder (docs/method.md §3): one TopK dictionary for every layer.

Inputs are residual-stream vectors, `[n_layers, *tokens, d]` or `[N, d]`, each an independent
example. The public names follow the original code (`MLSAE`, `TopK`, `encode`, `decode`,
`from_pretrained`, ...); the checkpoint format lives in `mlsae_core.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mlsae_core import checkpoint, interop
from mlsae_core.config import SAEConfig
from mlsae_core.sparse import selected_preacts, sparse_decode

STD_EPS = 1e-5
# Rows of pre-activations computed at once: bounds the dense [rows, n_latents] buffer.
ENCODE_CHUNK_ELEMENTS = 1 << 26


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low precision torch.autocast is running in on `device`, or None."""
    kind = device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return dtype if dtype != torch.float32 else None


class TopK(NamedTuple):
    values: torch.Tensor  # [..., k]
    indices: torch.Tensor  # [..., k] int64


class Stats(NamedTuple):
    mean: torch.Tensor  # [..., 1]
    std: torch.Tensor  # [..., 1]


class EncoderOutput(NamedTuple):
    topk: TopK
    auxk: TopK | None
    stats: Stats | None
    dead: torch.Tensor  # scalar: fraction of latents flagged dead before this batch
    fired: torch.Tensor  # [n_latents] bool: latents > dead_threshold somewhere in this batch


class AutoencoderOutput(NamedTuple):
    topk: TopK  # ReLU'd values of the k largest pre-activations
    recons: torch.Tensor  # [..., d] reconstruction in input space
    auxk: TopK | None  # ReLU'd top-auxk pre-activations among dead latents
    auxk_recons: torch.Tensor | None  # [..., d] their decode, no bias (standardized space)
    dead: torch.Tensor
    stats: Stats | None
    fired: torch.Tensor


def standardize(x: torch.Tensor, eps: float = STD_EPS) -> tuple[torch.Tensor, Stats]:
    """Per vector: subtract the mean over d, divide by (Bessel-corrected std + eps)."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True)
    return xc / (std + eps), Stats(mu, std)


@torch.no_grad()
def geometric_median(
    points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8
) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances. [N, d] -> [d]."""
    pts = points.reshape(-1, points.shape[-1]).double()
    median = pts.mean(dim=0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=-1).clamp_min(eps)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * max(1.0, median.norm().item()):
            break
    return median.to(points.dtype)


class MLSAE(nn.Module):
    """A TopK sparse autoencoder shared by the residual streams of many layers.

    encoder.weight [n_latents, n_inputs]; decoder.weight [n_inputs, n_latents], unit-norm
    columns, stored so that `decoder.weight.t()` (whose rows the decode gathers) is contiguous.
    `encoder_bias`: an encoder bias, which mlsae does not train but SAEs imported from other
    tools (sparsify) carry.
    """

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        auxk: int | None = SAEConfig.auxk,
        dead_tokens_threshold: int = SAEConfig.dead_tokens_threshold,
        dead_threshold: float = SAEConfig.dead_threshold,
        standardize: bool = SAEConfig.standardize,
        metadata: dict[str, Any] | None = None,
        encoder_bias: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k={k} is not allowed: need 1 <= k <= n_latents={n_latents}")
        if auxk is not None and auxk < 1:
            raise ValueError(f"auxk={auxk} is not allowed: None or an integer >= 1")
        self.n_inputs = n_inputs
        self.n_latents = n_latents
        self.k = k
        self.auxk = auxk
        self.dead_tokens_threshold = dead_tokens_threshold
        self.dead_threshold = dead_threshold
        self.standardize = standardize
        self.metadata: dict[str, Any] = dict(metadata or {})

        self.encoder = nn.Linear(n_inputs, n_latents, bias=encoder_bias)
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        # Tokens seen since each latent last fired (counted in tokens, docs/method.md §3.6).
        self.register_buffer(
            "tokens_since_fired", torch.zeros(n_latents, dtype=torch.long), persistent=False
        )
        with torch.no_grad():
            if encoder_bias:
                self.encoder.bias.zero_()
            self.decoder.weight = nn.Parameter(self.encoder.weight.detach().clone().t())
            self.normalize_decoder()

    @classmethod
    def from_config(
        cls, n_inputs: int, cfg: SAEConfig, metadata: dict[str, Any] | None = None
    ) -> MLSAE:
        """A fresh MLSAE for `n_inputs`-dimensional inputs, shaped by `cfg` (as training does)."""
        return cls(
            n_inputs=n_inputs,
            n_latents=cfg.n_latents(n_inputs),
            k=cfg.k,
            auxk=cfg.auxk,
            dead_tokens_threshold=cfg.dead_tokens_threshold,
            dead_threshold=cfg.dead_threshold,
            standardize=cfg.standardize,
            metadata=metadata,
        )

    # ----- geometry -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        w = self.decoder.weight
        w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each column's gradient its component along the (unit) column."""
        w, g = self.decoder.weight, self.decoder.weight.grad
        if g is not None:
            g.sub_(w * (w * g).sum(dim=0, keepdim=True))

    @torch.no_grad()
    def init_pre_encoder_bias(self, x: torch.Tensor) -> None:
        """Set the pre-encoder bias to the geometric median of (standardized) inputs."""
        flat = x.reshape(-1, self.n_inputs).float()
        if self.standardize:
            flat, _ = standardize(flat)
        self.pre_encoder_bias.copy_(geometric_median(flat).to(self.pre_encoder_bias))

    # ----- dead latents ---------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens_threshold

    @torch.no_grad()
    def update_dead(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance every latent's counter by n_tokens; reset those that fired."""
        self.tokens_since_fired.add_(n_tokens)
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0

    # ----- forward ----------------------------------------------------------------------
    def encode(self, inputs: torch.Tensor) -> EncoderOutput:
        """TopK of W_enc (x_hat - b); pre-activations are built in row chunks, never [N, n]."""
        lead = inputs.shape[:-1]
        x = inputs.reshape(-1, self.n_inputs)
        stats = None
        if self.standardize:
            x, stats = standardize(x)
        xb = x - self.pre_encoder_bias  # [N, d]
        dead = self.dead_mask()
        dead_idx = dead.nonzero().squeeze(-1)
        n_aux = 0 if self.auxk is None else min(self.auxk, int(dead_idx.numel()))
        weight, bias = self.encoder.weight, self.encoder.bias  # [n, d], [n] or None

        rows = max(1, ENCODE_CHUNK_ELEMENTS // self.n_latents)
        top_v, top_i, aux_v, aux_i = [], [], [], []
        with torch.no_grad():
            xb_ng, w_ng = xb.detach(), weight.detach()
            b_ng = None if bias is None else bias.detach()
            low = _autocast_dtype(x.device)
            if low is not None:  # cast once, not once per chunk as autocast would
                xb_ng, w_ng = xb_ng.to(low), w_ng.to(low)
                b_ng = None if b_ng is None else b_ng.to(low)
            for s in range(0, xb.shape[0], rows):
                z = xb_ng[s : s + rows] @ w_ng.t()  # [rows, n]
                if b_ng is not None:
                    z += b_ng
                v, i = torch.topk(z, self.k, dim=-1, sorted=False)
                top_v.append(v)
                top_i.append(i)
                if n_aux:
                    av, ai = torch.topk(z[:, dead_idx], n_aux, dim=-1, sorted=False)
                    aux_v.append(av)
                    aux_i.append(dead_idx[ai])
        indices = torch.cat(top_i)
        # Under mixed precision the k values come from the low-precision GEMM too, cast up:
        # recomputing them in float32 (a [N, k, d] gather) cost as much as the GEMM saves;
        # the decode, the losses and every gradient are float32 (docs/performance.md).
        top_values = torch.cat(top_v).to(xb.dtype)
        values = selected_preacts(xb, weight, indices, top_values)
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=x.device)
        fired[indices[values.detach() > self.dead_threshold]] = True
        topk = TopK(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))
        auxk = None
        if n_aux:
            aux_indices = torch.cat(aux_i)
            aux_top = torch.cat(aux_v).to(xb.dtype)
            aux_values = selected_preacts(xb, weight, aux_indices, aux_top)
            auxk = TopK(aux_values.reshape(*lead, n_aux), aux_indices.reshape(*lead, n_aux))
        if stats is not None:
            stats = Stats(stats.mean.reshape(*lead, 1), stats.std.reshape(*lead, 1))
        dead_frac = dead.float().mean()
        return EncoderOutput(topk, auxk, stats, dead_frac, fired)

    def decode(self, topk: TopK, stats: Stats | None = None) -> torch.Tensor:
        """Gather k decoder columns per vector (+ bias), then undo the standardization."""
        recons = sparse_decode(topk.indices, topk.values, self.decoder.weight.t())
        recons = recons + self.pre_encoder_bias
        if stats is not None:
            recons = recons * stats.std + stats.mean
        return recons

    def forward(self, inputs: torch.Tensor) -> AutoencoderOutput:
        topk, auxk, stats, dead, fired = self.encode(inputs)
        topk = TopK(torch.relu(topk.values), topk.indices)
        recons = self.decode(topk, stats)
        auxk_recons = None
        if auxk is not None:
            auxk = TopK(torch.relu(auxk.values), auxk.indices)
            auxk_recons = sparse_decode(auxk.indices, auxk.values, self.decoder.weight.t())
        return AutoencoderOutput(topk, recons, auxk, auxk_recons, dead, stats, fired)

    # ----- persistence: the format is mlsae_core.checkpoint's ----------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "n_inputs": self.n_inputs,
            "n_latents": self.n_latents,
            "k": self.k,
            "auxk": self.auxk,
            "dead_threshold": self.dead_threshold,
            "dead_tokens_threshold": self.dead_tokens_threshold,
            "standardize": self.standardize,
            **({"encoder_bias": True} if self.encoder.bias is not None else {}),
            **self.metadata,
        }

    def weights_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().contiguous().cpu() for name, t in self.named_parameters()}

    def save_pretrained(self, directory: str | Path) -> Path:
        """`checkpoint.save_sae(self, directory)`: weights and config.json, atomically."""
        return checkpoint.save_sae(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        device: str | torch.device = "cpu",
        **expect: Any,
    ) -> MLSAE:
        """A checkpoint directory or hub repo id (`interop.read_sae`); `expect` are musts."""
        kwargs, tensors = interop.read_sae(path_or_repo_id, **expect)
        sae = cls(**kwargs)
        checkpoint.load_weights(sae, tensors)
        return sae.to(device)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """`checkpoint.push_to_hub(self, ...)`: upload to the HF Hub (online users only)."""
        return checkpoint.push_to_hub(self, repo_id, private=private, token=token)
