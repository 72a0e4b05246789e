"""One streaming evaluation pass: metrics, and whatever analyses ride along (collectors).

The transformer runs once per batch: its clean pass gives every block's output, the SAE
encodes the chosen layers, and each collector (layer distributions, max-activating examples,
...) sees the same tensors. Splicing reuses the clean pass and only reruns the blocks after
the spliced layer; the zero-ablated distribution is input-independent, so it is computed once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mlsae_core.config import EvalConfig
from mlsae_core.metrics import (
    ReconstructionMetrics,
    SpliceMetrics,
    metrics_rows,
    unembedding_gram,
)
from mlsae_core.precision import resolve_precision
from mlsae_core.sae import MLSAE, TopK

if TYPE_CHECKING:
    from mlsae_core.lens import TunedLens

logger = logging.getLogger(__name__)

# Rows of [rows, vocab] logits handled at once when splicing: bounds evaluation memory and
# keeps each float32 chunk (128 x 50k = 26 MB) near the cache for the logsumexp/dot passes.
LOGIT_CHUNK_ROWS = 128

# W^T W of an unembedding, reused while its weight is unchanged (logit MSE, metrics.py).
_GRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gram(transformer: Any) -> torch.Tensor:
    """W^T W, times scale^2 where the head scales its logits (Cohere, Granite, ...)."""
    module = transformer.unembed  # modules hash by identity (tensors do not)
    weight = module.weight
    head = getattr(transformer, "head", None)
    scale = head.scale if head is not None else 1.0
    key = (weight.data_ptr(), weight._version, scale)
    hit = _GRAMS.get(module)
    if hit is None or hit[0] != key:
        gram = unembedding_gram(weight)
        hit = (key, gram * scale**2 if scale != 1.0 else gram)
        _GRAMS[module] = hit
    return hit[1]


@dataclass
class EvalBatch:
    """What every collector sees for one batch of token chunks."""

    rows: torch.Tensor  # [B] chunk indices
    tokens: torch.Tensor  # [B, P]
    mask: torch.Tensor  # [B, P] bool: counted (non-special) positions
    layers: list[int]
    x: torch.Tensor  # [L, N, d] activations at counted positions
    topk: TopK  # values, indices: [L, N, k] (ReLU'd)
    recons: torch.Tensor  # [L, N, d]
    batch_index: torch.Tensor  # [N] which row of the batch each counted position is in
    pos_index: torch.Tensor  # [N] its position within the row


class Collector(Protocol):
    def update(self, batch: EvalBatch) -> None: ...


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per layer plus 'avg' (metrics.METRIC_COLUMNS)
    splice: SpliceMetrics | None
    n_tokens: int
    # How the splice metrics were computed: True = logit-difference shortcut W dh (linear
    # head), False = spliced logits in full through the model's head (e.g. soft-capping);
    # None = no splice metrics.
    linear_head: bool | None = None


def prediction_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, P] positions whose input and next-token target are both non-special."""
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return pred


def resolve_delta_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype of the splice metrics' logit-difference GEMM.

    "auto" is bfloat16 where it is native (its measured error on KL/dCE: docs/performance.md,
    "Accuracy of the bfloat16 splice GEMM") and float32 elsewhere; "float32" is exact.
    """
    return resolve_precision(name, device, "delta_dtype")


@torch.no_grad()
def evaluate(
    transformer: Any,
    sae: MLSAE,
    tokens: torch.Tensor,
    masks: torch.Tensor,
    layers: Sequence[int],
    batch_size: int = 4,
    max_tokens: int | None = None,
    splice: bool = True,
    collectors: Iterable[Collector] = (),
    progress: bool = True,
    splice_max_tokens: int | None = None,
    delta_dtype: str | torch.dtype = EvalConfig.delta_dtype,
    lens: TunedLens | None = None,
) -> EvalResult:
    """Evaluate `sae` on chunk rows `tokens` [n, P] (masks: counted positions), in order.

    max_tokens caps the positions read (whole batches). With splice=False only the blocks up
    to the last requested layer run, which is much cheaper. splice_max_tokens limits the
    splice metrics (one partial forward per layer: the costly part) to the first batches
    covering that many positions; reconstruction metrics and collectors still see every batch.
    delta_dtype is the precision of the spliced-minus-clean logit GEMM (resolve_delta_dtype).
    With a tuned `lens` the SAE sees lens-transformed activations: the reconstruction metrics
    and the collectors are in that space, and each reconstruction is mapped back through the
    inverse translator before it is spliced, so dCE/KL compare with a plain MLSAE's.
    """
    from tqdm.auto import tqdm

    layers = list(layers)
    collectors = list(collectors)
    sae.eval()
    device = next(sae.parameters()).device
    recon = ReconstructionMetrics(len(layers), sae.n_latents, sae.n_inputs, sae.dead_threshold)
    splicer = _Splicer(transformer, layers, delta_dtype, lens) if splice else None
    n_rows, pos = tokens.shape
    if max_tokens is not None:
        n_rows = min(n_rows, max(1, -(-max_tokens // pos)))
    bar = tqdm(total=n_rows * pos, unit="tok", unit_scale=True, disable=not progress, desc="eval")
    for start in range(0, n_rows, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_rows))
        toks = tokens[rows].to(transformer.device)
        mask = masks[rows].to(transformer.device)
        splice_now = splice and (splice_max_tokens is None or start * pos < splice_max_tokens)
        if splice_now:
            clean = transformer.clean_pass(toks, with_logits=False)
            acts = clean.hidden[layers]  # [L, B, P, d]
        else:
            clean = None
            acts = transformer.activations(toks, layers)
        x = acts[:, mask].float().to(device)  # [L, N, d]
        if lens is not None:
            x = lens.transform(x, layers)
        out = sae(x)  # float32: the evaluation is the exact reference for every precision
        b_idx, p_idx = mask.nonzero(as_tuple=True)
        recon.update(x, out.recons, out.topk.values, out.topk.indices, first=p_idx == 0)
        batch = EvalBatch(rows, toks, mask, layers, x, out.topk, out.recons, b_idx, p_idx)
        for c in collectors:
            c.update(batch)
        if splicer is not None and clean is not None:
            splicer.update(clean, toks, mask, out.recons)
        bar.update(len(rows) * pos)
    bar.close()
    spl = splicer.metrics if splicer is not None else None
    linear = splicer.linear if splicer is not None else None
    return EvalResult(metrics_rows(layers, recon, spl), spl, recon.n_tokens, linear)


class _Splicer:
    """The splice metrics of one evaluation: each layer's reconstruction spliced into the
    clean pass, the rest of the model run, CE/KL against the clean and zero-ablated logits."""

    def __init__(
        self, transformer: Any, layers: list[int], delta_dtype: Any, lens: TunedLens | None
    ) -> None:
        self.transformer, self.layers, self.lens = transformer, layers, lens
        self.metrics = SpliceMetrics(len(layers))
        self.zero_lp: dict[int, torch.Tensor] = {}
        self.gram: torch.Tensor | None = None
        self.dtype = resolve_delta_dtype(delta_dtype, transformer.device)
        # The shortcut holds only for a head affine in the final-normed state; otherwise every
        # spliced logit goes through the model's own head (exact, slower, float64 sums).
        self.linear = bool(getattr(transformer, "linear_head", True))

    def update(
        self, clean: Any, toks: torch.Tensor, mask: torch.Tensor, recons: torch.Tensor
    ) -> None:
        tr, spl = self.transformer, self.metrics
        pred = prediction_mask(mask)
        targets = toks[:, 1:][pred[:, :-1]]
        if not targets.numel():
            return
        if self.gram is None:
            self.gram = _gram(tr)
        final = tr.final_norm(clean.hidden[-1])[pred]  # [M, d]
        if self.linear:
            ref = spl.update_clean_chunked(tr.logits, final, targets, LOGIT_CHUNK_ROWS)
        else:
            ref = _update_clean_full(spl, tr, final, targets)
        for i, layer in enumerate(self.layers):
            if layer not in self.zero_lp:
                self.zero_lp[layer] = tr.zero_ablation_log_probs(clean, layer)
            replacement = clean.hidden[layer].clone()
            spliced = recons[i]
            if self.lens is not None:  # back to the model's own space
                spliced = self.lens.inverse(spliced[None], [layer])[0]
            replacement[mask] = spliced.to(replacement.dtype).to(replacement.device)
            hidden = tr.run_from(clean, layer, replacement)[pred]
            if not self.linear:
                _update_layer_full(spl, tr, i, ref, hidden, targets, self.zero_lp[layer])
                continue
            spl.update_layer_chunked(
                i,
                ref,
                lambda dh: tr.logit_difference(dh, self.dtype),
                hidden,
                targets,
                self.zero_lp[layer],
                self.gram,
                LOGIT_CHUNK_ROWS,
            )


def _update_clean_full(
    spl: SpliceMetrics, transformer: Any, final: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Clean logits [M, V] float32 through the model's head, CE summed in float64 chunks."""
    chunks = []
    for a in range(0, final.shape[0], LOGIT_CHUNK_ROWS):
        sl = slice(a, a + LOGIT_CHUNK_ROWS)
        z = transformer.logits(final[sl]).float()
        spl.update_clean(z, targets[sl])
        chunks.append(z)
    return torch.cat(chunks)


def _update_layer_full(
    spl: SpliceMetrics,
    transformer: Any,
    i: int,
    clean_logits: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    zero_lp: torch.Tensor,
) -> None:
    """The exact path for a nonlinear head: spliced logits in full, metrics in float64."""
    for a in range(0, hidden.shape[0], LOGIT_CHUNK_ROWS):
        sl = slice(a, a + LOGIT_CHUNK_ROWS)
        spliced = transformer.logits(hidden[sl]).float()
        spl.update_layer(i, clean_logits[sl], spliced, targets[sl], zero_lp)
