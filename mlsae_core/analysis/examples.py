"""Max-activating examples for every (latent, layer), with their context (docs/method.md §5).

Collection keeps a FIXED-SIZE top-`n_examples` per (layer, latent): a float32 values tensor
and an int64 location tensor (row * seq_len + pos), both [L, n_latents, n_examples]. Each
batch's candidates are merged in with a sort, so memory never grows with the number of
batches: 12 bytes per slot, e.g. 30 layers x 36,864 latents x 32 examples = 35M slots =
425 MB (SmolLM2, expansion 64). Ties are broken by the earlier location, so the result is the
same for any batch split (streaming == one batch).

Context activations are not stored at collection time (that would be 2*n_context+1 times the
memory); `result` re-encodes only the chunk rows that hold kept examples, through a
`RowEncoder` (see `sae_row_encoder`), and reads the latent's value on each context token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlsae_core.analysis.dists import TopKCollector
from mlsae_core.config import EvalConfig, SAEConfig
from mlsae_core.sae import TopK

if TYPE_CHECKING:
    from mlsae_core.evaluate import EvalBatch
    from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

# rows [B] -> TopK of values/indices [L, B, P, k] (ReLU'd; zero at positions not evaluated).
RowEncoder = Callable[[torch.Tensor], TopK]


def token_strings(tokenizer: Any, ids: Iterable[int]) -> dict[int, str]:
    """Readable text of single tokens: byte-level markers become text ("Ġ" -> " ", "Ċ" -> "\\n")."""
    out: dict[int, str] = {}
    for i in sorted({int(x) for x in ids}):
        try:
            tok = tokenizer.convert_ids_to_tokens(i)
            text = tokenizer.convert_tokens_to_string([tok]) if tok is not None else None
        except Exception:  # noqa: BLE001 - tokenizers differ; fall back to decode
            text = None
        if text is None:
            text = tokenizer.decode([i])
        out[i] = text
    return out


def sae_row_encoder(
    transformer: Any,
    sae: MLSAE,
    tokens: torch.Tensor,
    layers: Sequence[int],
    masks: torch.Tensor | None = None,
    lens: Any = None,
) -> RowEncoder:
    """A `RowEncoder` running the transformer (through the run's tuned `lens`, if any) and the
    SAE on chunk rows of `tokens` [R, P].

    Positions where `masks` is False (BOS/EOS/PAD, excluded from evaluation) get value 0.
    """
    layers = list(layers)
    device = next(sae.parameters()).device

    @torch.no_grad()
    def encode(rows: torch.Tensor) -> TopK:
        toks = tokens[rows].to(transformer.device)  # [B, P]
        acts = transformer.activations(toks, layers).float().to(device)  # [L, B, P, d]
        if lens is not None:
            acts = lens.transform(acts, layers)
        topk = sae(acts).topk  # [L, B, P, k]
        values = topk.values
        if masks is not None:
            keep = masks[rows].to(values.device)[None, :, :, None]  # [1, B, P, 1]
            values = torch.where(keep, values, torch.zeros_like(values))
        return TopK(values.cpu(), topk.indices.cpu())

    return encode


@dataclass
class ExamplesResult:
    """Kept examples in (layer_index, latent, rank) order; M examples, C = 2*n_context+1."""

    layers: list[int]
    n_context: int
    latent: torch.Tensor  # [M] int64
    layer_index: torch.Tensor  # [M] int64 position in `layers`
    rank: torch.Tensor  # [M] int64 0 = highest activation
    activation: torch.Tensor  # [M] float32
    row: torch.Tensor  # [M] int64 chunk row
    pos: torch.Tensor  # [M] int64 position in the row
    token_id: torch.Tensor  # [M] int64
    context_ids: torch.Tensor  # [M, C] int64 token at pos-n_context..pos+n_context, -1 outside
    context_acts: torch.Tensor  # [M, C] float32 latent at the same layer there, NaN outside
    strings: dict[int, str]  # token id -> readable text

    def __len__(self) -> int:
        return int(self.latent.numel())

    @property
    def layer(self) -> torch.Tensor:
        """[M] actual block ids."""
        return torch.tensor(self.layers, dtype=torch.int64)[self.layer_index]

    @property
    def context_valid(self) -> torch.Tensor:
        return self.context_ids >= 0  # [M, C]

    @property
    def centre(self) -> torch.Tensor:
        """[M] offset of the example token within its clipped context window."""
        return torch.clamp(self.pos, max=self.n_context)


class MaxExamples(TopKCollector):
    """Collector for `evaluate`: top `n_examples` tokens per (layer, latent), fixed memory."""

    def __init__(
        self,
        n_latents: int,
        layers: Sequence[int],
        n_examples: int = EvalConfig.n_examples,
        n_context: int = EvalConfig.n_context,
        dead_threshold: float = SAEConfig.dead_threshold,
        device: str | torch.device = "cpu",
    ) -> None:
        """`device` holds the state and does the merging (a GPU makes the sorts cheap)."""
        super().__init__(n_latents, layers, dead_threshold)
        self.n_examples = n_examples
        self.device = torch.device(device)
        self.n_context = n_context
        shape = (len(self.layers), n_latents, n_examples)
        self.values = torch.full(shape, -math.inf, dtype=torch.float32, device=self.device)
        self.locs = torch.full(shape, -1, dtype=torch.int64, device=self.device)  # row*P + pos
        self.seq_len: int | None = None

    def update(self, batch: EvalBatch) -> None:
        self.check_layers(batch)
        rows = batch.rows.cpu()[batch.batch_index.cpu()]  # [N]
        self.add(
            batch.topk.values,
            batch.topk.indices,
            rows,
            batch.pos_index.cpu(),
            batch.tokens.shape[1],
        )

    @torch.no_grad()
    def add(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        rows: torch.Tensor,
        pos: torch.Tensor,
        seq_len: int,
    ) -> None:
        """values, indices: [L, N, k]; rows, pos: [N] chunk row and position of each token."""
        if self.seq_len is None:
            self.seq_len = int(seq_len)
        elif self.seq_len != seq_len:
            raise ValueError(f"sequence length changed from {self.seq_len} to {seq_len}")
        dev = self.device
        loc = rows.to(dev, torch.int64) * self.seq_len + pos.to(dev, torch.int64)  # [N]
        k = values.shape[-1]
        loc_k = loc[:, None].expand(-1, k).reshape(-1)  # [N*k]
        for li in range(len(self.layers)):
            v = values[li].detach().to(dev, torch.float32).reshape(-1)  # [N*k]
            j = indices[li].detach().to(dev).reshape(-1)
            # Only candidates at least as large as the latent's current E-th value can enter
            # (>=, so a tie with an earlier location still wins): after a few batches this
            # drops almost everything before the sort.
            keep = (v > self.dead_threshold) & (v >= self.values[li, j, -1])
            self._merge(li, v[keep], j[keep], loc_k[keep])

    def _merge(self, li: int, v: torch.Tensor, j: torch.Tensor, loc: torch.Tensor) -> None:
        """Merge candidates (value, latent, location) of one layer into the kept top-E."""
        if v.numel() == 0:
            return
        order = _order_rows(v[None], loc[None])[0]  # by value descending, ties by location
        order = order[torch.sort(j[order], stable=True).indices]  # by latent, then rank
        v, j, loc = v[order], j[order], loc[order]
        touched, counts = torch.unique_consecutive(j, return_counts=True)  # [T]
        starts = torch.cumsum(counts, 0) - counts
        dev = v.device
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=dev), counts)
        rank = torch.arange(v.numel(), device=dev) - starts[group]
        sel = rank < self.n_examples
        e = self.n_examples
        cand_v = torch.full((touched.numel(), e), -math.inf, dtype=torch.float32, device=dev)
        cand_l = torch.full((touched.numel(), e), -1, dtype=torch.int64, device=dev)  # [T, E]
        cand_v[group[sel], rank[sel]] = v[sel]
        cand_l[group[sel], rank[sel]] = loc[sel]
        mv = torch.cat([self.values[li, touched], cand_v], 1)  # [T, 2E]
        ml = torch.cat([self.locs[li, touched], cand_l], 1)
        keep = _order_rows(mv, ml)[:, :e]
        self.values[li, touched] = mv.gather(1, keep)
        self.locs[li, touched] = ml.gather(1, keep)

    @torch.no_grad()
    def result(
        self,
        tokens: torch.Tensor,
        tokenizer: Any | None = None,
        encode_rows: RowEncoder | None = None,
        batch_size: int = 8,
    ) -> ExamplesResult:
        """Assemble the kept examples with +-n_context tokens of context (clipped at row edges).

        tokens: [R, P] the chunk rows that were evaluated. With `encode_rows`, the latent's
        activation on every context token is recomputed from the rows holding examples;
        without it, only the centre activation is known (others NaN).
        """
        values, locs = self.values.cpu(), self.locs.cpu()
        filled = values > -math.inf  # [L, n, E]
        li, lat, rank = filled.nonzero(as_tuple=True)  # [M] each, in (layer, latent, rank) order
        act = values[li, lat, rank]
        loc = locs[li, lat, rank]
        seq_len = self.seq_len if self.seq_len is not None else int(tokens.shape[1])
        if int(tokens.shape[1]) != seq_len:
            raise ValueError(f"tokens have {tokens.shape[1]} positions, examples {seq_len}")
        row, pos = loc // seq_len, loc % seq_len
        c = self.n_context
        offsets = torch.arange(-c, c + 1)  # [C]
        q = pos[:, None] + offsets[None, :]  # [M, C]
        valid = (q >= 0) & (q < seq_len)
        qc = q.clamp(0, seq_len - 1)
        tokens = tokens.cpu()
        ctx_ids = torch.where(valid, tokens[row[:, None], qc], -1)  # [M, C]
        ctx_acts = torch.full(ctx_ids.shape, math.nan, dtype=torch.float32)
        ctx_acts[:, c] = act
        if encode_rows is not None and act.numel():
            ctx_acts = _context_acts(encode_rows, li, lat, row, qc, valid, batch_size)
        ids = ctx_ids[valid].unique().tolist()
        strings = (
            token_strings(tokenizer, ids) if tokenizer is not None else {i: str(i) for i in ids}
        )
        logger.info("assembled %d max-activating examples", act.numel())
        return ExamplesResult(
            layers=self.layers,
            n_context=c,
            latent=lat,
            layer_index=li,
            rank=rank,
            activation=act,
            row=row,
            pos=pos,
            token_id=ctx_ids[:, c].clone(),
            context_ids=ctx_ids,
            context_acts=ctx_acts,
            strings=strings,
        )


def _order_rows(v: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Per row of [T, W]: column order by value descending, ties by location ascending."""
    by_loc = torch.sort(loc, dim=1, stable=True).indices
    v_sorted = v.gather(1, by_loc)
    return by_loc.gather(1, torch.sort(v_sorted, dim=1, descending=True, stable=True).indices)


def _context_acts(
    encode_rows: RowEncoder,
    li: torch.Tensor,
    lat: torch.Tensor,
    row: torch.Tensor,
    qc: torch.Tensor,
    valid: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """[M, C] latent lat[m] at layer li[m] on positions qc[m] of row[m]; NaN where invalid."""
    out = torch.full(qc.shape, math.nan, dtype=torch.float32)
    perm = torch.argsort(row, stable=True)
    rows_sorted = row[perm]
    unique_rows = torch.unique(rows_sorted)
    for s in range(0, unique_rows.numel(), batch_size):
        chunk = unique_rows[s : s + batch_size]  # [B]
        lo = int(torch.searchsorted(rows_sorted, chunk[0]))
        hi = int(torch.searchsorted(rows_sorted, chunk[-1], right=True))
        m = perm[lo:hi]  # examples in these rows
        topk = encode_rows(chunk)
        b = torch.searchsorted(chunk, row[m])  # [m] local row
        lidx, bidx, q = li[m][:, None], b[:, None], qc[m]  # [m, 1], [m, 1], [m, C]
        vals = topk.values[lidx, bidx, q].float()  # [m, C, k]
        idxs = topk.indices[lidx, bidx, q]
        acts = torch.where(idxs == lat[m][:, None, None], vals, 0.0).sum(-1)  # [m, C]
        out[m] = torch.where(valid[m], acts, math.nan)
    return out
