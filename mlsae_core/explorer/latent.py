"""A page per latent (docs/explorer.md, "Latent pages"): the one place its data is computed,
for `GET /api/latent/{latent}` and for the static dashboard export (`export_dashboard`).

The layer distribution and densities come from the run directory's `latent_layer_dists` table
when there is one (`tables.dists_from_layer_table`), else from a held-out sample: the first
`latent_tokens` tokens of the checkpoint's held-out split (`data.held_out_split`), in rows of at
most `max_prompt_tokens`, encoded once on the first request and kept (its bytes are a term of
the explorer's memory bound, `memory.latent_bytes`). The histogram and the quantile examples
always come from the sample; the max-activating examples from the explorer's max_examples
table when loaded, else from the sample.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.exceptions import HTTPException

from mlsae_core import atomic
from mlsae_core.analysis.dists import DistsResult, LayerDists
from mlsae_core.analysis.examples import sae_row_encoder
from mlsae_core.analysis.tables import dists_from_layer_table
from mlsae_core.chunks import TokenChunks
from mlsae_core.config import DataConfig, EvalConfig
from mlsae_core.data import held_out_split
from mlsae_core.explorer import schemas as sc
from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.service import Explorer, load_explorer
from mlsae_core.explorer.wire import finite
from mlsae_core.layout import RunLayout

logger = logging.getLogger(__name__)

N_TOKENS = 10  # output tokens each way
N_NEIGHBOURS = 10
N_MAX_EXAMPLES = 8  # per layer
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
N_PER_QUANTILE = 3
BINS = 20


@dataclass
class Sample:
    """The MLSAE's top-k on held-out chunk rows; T = rows x positions."""

    chunks: TokenChunks  # tokens [R, P], doc_index, documents
    mask: torch.Tensor  # [R, P] bool: not BOS/EOS/PAD
    values: torch.Tensor  # [L, T, k] float32, 0 at masked positions
    indices: torch.Tensor  # [L, T, k] int32

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def latent_row(self, latent: int) -> torch.Tensor:
        """[L, T] the latent's value on every sampled token at every layer."""
        return torch.where(self.indices == latent, self.values, 0.0).sum(-1)


class LatentPages:
    """The latent pages of one explorer: what they read is loaded or computed once."""

    def __init__(self, ex: Explorer) -> None:
        self.ex = ex
        self._lock = threading.Lock()
        self._loaded = False
        self.sample: Sample | None = None
        self.message: str | None = None  # why there is no sample
        self.dists: DistsResult | None = None
        self.dists_source: str | None = None

    def load(self) -> None:
        """Read the run directory's distribution and encode the sample, once."""
        with self._lock:
            if self._loaded:
                return
            run = self.ex.run_dir
            path = None if run is None else RunLayout(run).table("latent_layer_dists")
            if path is not None and path.is_file():
                try:
                    self.dists = dists_from_layer_table(atomic.read_parquet(path))
                    self.dists_source = str(path)
                except Exception as exc:  # noqa: BLE001 - fall back to the sample
                    logger.warning("cannot read %s: %s; using the held-out sample", path, exc)
            try:
                self.sample = self._encode_sample()
            except Exception as exc:  # noqa: BLE001 - the other sections work without it
                self.message = f"no held-out sample ({type(exc).__name__}: {exc})"
                logger.warning("latent pages: %s", self.message)
            self._loaded = True

    def _encode_sample(self) -> Sample:
        """Encode the sample; its layer distribution too when no table gave one."""
        ex = self.ex
        meta = ex.sae.metadata
        if not meta.get("dataset"):
            raise ValueError("the checkpoint's config.json does not record its dataset")
        length = min(int(meta.get("max_length", DataConfig.max_length)), ex.max_prompt_tokens)
        chunks = held_out_split(meta, ex.transformer, ex.settings.latent_tokens, None, length)
        mask = chunks.mask()
        encode = sae_row_encoder(ex.transformer, ex.sae, chunks.tokens, ex.layers, mask, ex.lens)
        n_rows, n_pos = chunks.tokens.shape
        per = max(1, ex.max_prompt_tokens // n_pos)  # a batch is at most one longest prompt
        dists = LayerDists(ex.sae.n_latents, ex.layers, dead_threshold=ex.sae.dead_threshold)
        values, indices = [], []
        with ex.compute_lock:  # one model computation at a time
            for start in range(0, n_rows, per):
                rows = torch.arange(start, min(start + per, n_rows))
                topk = encode(rows)  # [L, B, P, k]
                v, i = topk.values.flatten(1, 2), topk.indices.flatten(1, 2)
                if self.dists is None:
                    keep = mask[rows].flatten()
                    dists.add(v[:, keep], i[:, keep])
                values.append(v.float())
                indices.append(i.int())
        if self.dists is None:
            self.dists = dists.result()
            self.dists_source = f"held-out sample ({dists.n_tokens} tokens)"
        return Sample(chunks, mask, torch.cat(values, 1), torch.cat(indices, 1))

    # ----- the page ----------------------------------------------------------------------------
    def check(self, latent: int | str) -> None:
        """404 naming the valid range, for an id outside 0..n-1 (the API and the HTML page)."""
        n = self.ex.sae.n_latents
        if not (str(latent).isascii() and str(latent).isdigit() and int(latent) < n):
            raise HTTPException(
                404, f"latent={latent} is out of range: the MLSAE has {n} latents (0..{n - 1})"
            )

    def page(self, latent: int) -> dict[str, Any]:
        """Everything on the latent's page (`schemas.LatentOut`); 404 outside 0..n-1."""
        self.check(latent)
        ex, n = self.ex, self.ex.sae.n_latents
        self.load()
        s, d = self.sample, self.dists
        row = None if s is None else s.latent_row(latent)  # [L, T]
        sampled = None if s is None else f"held-out sample ({s.n_tokens} tokens)"
        return {
            "latent": latent,
            "n_latents": n,
            "layers": ex.layers,
            "live": None if d is None else bool(d.live[latent]),
            "layer_mean": None if d is None else finite(d.layer_mean[latent]),
            "layer_std": None if d is None else finite(d.layer_std[latent]),
            "n_tokens": None if d is None else d.n_tokens,
            "per_layer": [] if d is None else self._per_layer(d, latent),
            "dists_source": self.dists_source,
            "histogram": None if row is None else self._histogram(row),
            "output_effects": self._output_effects(latent),
            "max_examples": self._max_examples(latent, row),
            "examples_source": ex.examples.source if ex.examples is not None else sampled,
            "quantile_examples": [] if row is None else self._quantile_examples(latent, row),
            "neighbours": self._neighbours(latent),
            "sample_tokens": 0 if s is None else s.n_tokens,
            "message": self.message,
        }

    def _per_layer(self, d: DistsResult, latent: int) -> list[dict[str, Any]]:
        return [
            {
                "layer": layer,
                "p": finite(d.p[li, latent]),
                "count": int(d.counts[li, latent]),
                "density": finite(d.counts[li, latent] / max(d.n_tokens, 1)),
            }
            for li, layer in enumerate(d.layers)
        ]

    def _histogram(self, row: torch.Tensor) -> dict[str, Any]:
        fired = row > self.ex.sae.dead_threshold
        top = float(row[fired].max()) if bool(fired.any()) else 1.0
        counts = [
            torch.histc(r[f].double(), bins=BINS, min=0.0, max=top).long().tolist()
            for r, f in zip(row, fired, strict=True)
        ]
        return {"edges": torch.linspace(0.0, top, BINS + 1).tolist(), "counts": counts}

    @torch.no_grad()
    def _output_effects(self, latent: int) -> list[dict[str, Any]]:
        """W_U (N(d) - N(0)) for the unit decoder column d in the model's space (through the
        lens's inverse at each layer, when the run has one), N the final norm: the logits of
        the direction alone, as the model normalizes a residual (the head's bias cancels)."""
        ex, tf = self.ex, self.ex.transformer
        column = ex.sae.decoder.weight[:, latent].detach().float().cpu()
        if ex.lens is None:
            directions = [(None, column)]
        else:
            directions = [(layer, ex.lens.inverse_direction(column, layer)) for layer in ex.layers]

        def logits(v: torch.Tensor) -> torch.Tensor:
            return tf.logits(tf.final_norm(v.to(tf.device, tf.dtype))).double().cpu()

        zero = logits(torch.zeros_like(column))
        out = []
        for layer, v in directions:
            effect = logits(v) - zero
            k = min(N_TOKENS, effect.numel())
            up, down = torch.topk(effect, k), torch.topk(-effect, k)
            out.append(
                {
                    "layer": layer,
                    "positive": ex._tokens(up.indices, delta=up.values),
                    "negative": ex._tokens(down.indices, delta=-down.values),
                }
            )
        return out

    def _max_examples(self, latent: int, row: torch.Tensor | None) -> list[dict[str, Any]]:
        ex = self.ex
        out = []
        for li, layer in enumerate(ex.layers):
            if ex.examples is not None:
                rows = ex.examples.get(latent, layer, N_MAX_EXAMPLES)
            elif row is not None:
                order = torch.sort(row[li], descending=True, stable=True).indices[:N_MAX_EXAMPLES]
                order = order[row[li, order] > ex.sae.dead_threshold].tolist()
                rows = [self._example(latent, row, li, t, rank) for rank, t in enumerate(order)]
            else:
                continue
            out.append({"layer": layer, "examples": rows})
        return out

    def _quantile_examples(self, latent: int, row: torch.Tensor) -> list[dict[str, Any]]:
        """For each quantile q of the latent's fired values over every (layer, token): the
        N_PER_QUANTILE values around it in sorted order, each with its context."""
        where = (row > self.ex.sae.dead_threshold).nonzero()  # [m, 2] (layer index, token)
        if not len(where):
            return []
        values = row[where[:, 0], where[:, 1]]
        order = torch.sort(values, descending=True, stable=True).indices  # rank 0 = largest
        m, half = len(order), N_PER_QUANTILE // 2
        out = []
        for q in QUANTILES:
            centre = m - 1 - round(q * (m - 1))  # rank of the value at index q (m - 1)
            ranks = range(max(0, centre - half), min(m, centre - half + N_PER_QUANTILE))
            examples = []
            for rank in ranks:
                li, t = where[order[rank]].tolist()
                examples.append(self._example(latent, row, li, t, rank))
            out.append({"quantile": q, "activation": finite(values[order[centre]]),
                        "examples": examples})  # fmt: skip
        return out

    def _example(
        self, latent: int, row: torch.Tensor, li: int, t: int, rank: int
    ) -> dict[str, Any]:
        """Token t of the sample at layer index li, as a max_examples row (docs/tables.md):
        +-n_context tokens clipped at the chunk row's edges."""
        s = self.sample
        assert s is not None
        n_pos, c = s.chunks.tokens.shape[1], EvalConfig.n_context
        r, pos = divmod(t, n_pos)
        lo, hi = max(0, pos - c), min(n_pos, pos + c + 1)
        ids = s.chunks.tokens[r, lo:hi].tolist()
        doc = int(s.chunks.doc_index[r, pos])
        document = s.chunks.documents[doc] if doc >= 0 else None
        return {
            "latent": latent,
            "layer": self.ex.layers[li],
            "rank": rank,
            "activation": finite(row[li, t]),
            "token_id": ids[pos - lo],
            "token": self.ex.strings([ids[pos - lo]])[0],
            "centre": pos - lo,
            "context_tokens": self.ex.strings(ids),
            "context_activations": [finite(a) for a in row[li, t - pos + lo : t - pos + hi]],
            "row": r,
            "pos": pos,
            "document": None if document is None else document.id,
            "genre": None if document is None else getattr(document, "genre", None),
        }

    @torch.no_grad()
    def _neighbours(self, latent: int) -> list[dict[str, Any]]:
        w = self.ex.sae.decoder.weight.detach().float()  # [d, n]
        v = w[:, latent]
        cos = (v @ w) / (w.norm(dim=0) * v.norm()).clamp_min(1e-12)  # [n]
        cos[latent] = -math.inf
        top = torch.topk(cos.cpu(), min(N_NEIGHBOURS, cos.numel() - 1))
        mean = None if self.dists is None else self.dists.layer_mean
        return [
            {
                "latent": j,
                "cosine": finite(c),
                "layer_mean": None if mean is None else finite(mean[j]),
            }
            for j, c in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]


# ----- the static export ---------------------------------------------------------------------
def export_dashboard(
    source: str | Path | LatentPages,
    out_dir: str | Path,
    settings: ExplorerSettings | None = None,
    latents: list[int] | None = None,
) -> list[Path]:
    """Write `out_dir/index.json` and `out_dir/latents/<id>.json` (a latent page's JSON, as
    `GET /api/latent/<id>` answers it) for `latents`, by default every live latent (every
    latent when there is no distribution); returns the paths, index first.

    source: a checkpoint directory or hub id (loaded with `settings`), or the `LatentPages`
    of a running app (`app.state.latents`).
    """
    pages = (
        source
        if isinstance(source, LatentPages)
        else LatentPages(load_explorer(str(source), settings))
    )
    pages.load()
    d, n = pages.dists, pages.ex.sae.n_latents
    if latents is None:
        latents = list(range(n)) if d is None else d.live.nonzero().squeeze(-1).tolist()
    out = Path(out_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    written, entries = [], []
    for j in latents:
        page = sc.LatentOut.model_validate(pages.page(j)).model_dump(mode="json")
        path = out / "latents" / f"{j}.json"
        atomic.write_json(path, page)
        written.append(path)
        keys = ("latent", "live", "layer_mean", "layer_std")
        entries.append({**{k: page[k] for k in keys}, "file": f"latents/{j}.json"})
    ex = pages.ex
    index = {
        "model_name": ex.sae.metadata.get("model_name", ex.transformer.name),
        "n_latents": n,
        "layers": ex.layers,
        "dists_source": pages.dists_source,
        "sample_tokens": 0 if pages.sample is None else pages.sample.n_tokens,
        "latents": entries,
    }
    atomic.write_json(out / "index.json", index)
    return [out / "index.json", *written]
