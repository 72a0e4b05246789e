"""What the explorer computes, independent of HTTP: prompt analysis, splices and steering.

`Explorer` holds one MLSAE, its transformer and (optionally) the max-activating examples
table. A prompt is analysed once (`prompt_result`): tokens, one clean forward keeping every
block output, the SAE's top-k latents and reconstruction at each of its layers, and the
prompt's metrics. Results live in a byte-bounded LRU cache, so a repeated prompt costs a
dictionary lookup and memory never grows without bound. Splices (reconstruction, steering)
are cached separately, keeping only the final-normed hidden states `[P, d]` (logits at a
position are one `[d] x [d, vocab]` product away).

Steering (`steer_logits`), precisely. Let x_l[p] be block l's output at position p,
s_l[p] the standardization scale (std over d of x_l[p], or 1 when the SAE does not
standardize), d_j the unit decoder column of latent j, and v_l[p] latent j's (ReLU'd top-k)
value there. Changing a latent's value by delta changes the SAE's reconstruction by
delta * s_l[p] * d_j, so we add exactly that change to the true residual stream (the SAE's
reconstruction error is kept), at every non-special position of the prompt, and run the
rest of the model from block l + 1:

    x'_l[p] = x_l[p] + (v'[p] - v_l[p]) * s_l[p] * d_j

* mode "scale" (default): v'[p] = factor * v_l[p]. factor = 1 is the clean run exactly,
  factor = 0 ablates the latent, factor = 5 amplifies it; it does nothing where the latent
  is inactive.
* mode "add": v'[p] = v_l[p] + factor * a_j, with a_j the activation scale of latent j at
  layer l: its top max-activating example's activation when the examples table is loaded,
  else its largest value at layer l on this prompt, else the mean of all non-zero latent
  values at layer l on this prompt. This steers latents that are not active on the prompt.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlsae_core.analysis.examples import token_strings
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import CleanPass, Transformer

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "max_examples.parquet"
NO_EXAMPLES_HINT = "no examples computed; run mlsae examples --repo_id {repo}"
STEER_MODES = ("scale", "add")


class ExplorerInputError(ValueError):
    """A request parameter is out of range; the message says which and what is allowed."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (and on the caches)."""

    max_prompt_chars: int = 2000
    max_prompt_tokens: int = 128
    max_factor: float = 1000.0
    max_top_k: int = 50
    max_bins: int = 100
    max_heatmap_latents: int = 256
    max_examples: int = 64
    cache_entries: int = 64
    cache_bytes: int = 512 * 2**20
    splice_cache_entries: int = 256
    splice_cache_bytes: int = 128 * 2**20


# ----- a thread-safe LRU cache bounded by entries and bytes ----------------------------------
class ByteLRU:
    """LRU mapping whose total size (as reported by the caller) stays under `max_bytes`."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache limits must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, count: bool = True) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += count
                return None
            self._data.move_to_end(key)
            self.hits += count
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Insert (an item larger than the whole budget is simply not kept)."""
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return
            self._data[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, size) = self._data.popitem(last=False)
                self._bytes -= size

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors in obj (nested dicts/lists/tuples), plus a small overhead."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 64


def finite(x: float) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers become null."""
    x = float(x)
    return x if math.isfinite(x) else None


# ----- max-activating examples ---------------------------------------------------------------
class ExamplesStore:
    """The `max_examples` table (docs/tables.md), indexed by (latent, layer), in memory."""

    REQUIRED = (
        "latent",
        "layer",
        "rank",
        "activation",
        "token",
        "centre",
        "context_tokens",
        "context_activations",
    )
    OPTIONAL = ("token_id", "row", "pos", "document", "genre")

    def __init__(self, table: Any, source: str = "table") -> None:
        import numpy as np

        missing = [c for c in self.REQUIRED if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{source} lacks columns {missing}: not a max_examples table (docs/tables.md)"
            )
        keep = [*self.REQUIRED, *(c for c in self.OPTIONAL if c in table.column_names)]
        table = table.select(keep)
        latent = table["latent"].to_numpy().astype(np.int64)
        layer = table["layer"].to_numpy().astype(np.int64)
        rank = table["rank"].to_numpy().astype(np.int64)
        order = np.lexsort((rank, layer, latent))  # by latent, then layer, then rank
        self.source = source
        self.table = table.take(order)
        self._stride = int(layer.max()) + 1 if len(layer) else 1
        self._keys = latent[order] * self._stride + layer[order]  # sorted
        self._act = self.table["activation"].to_numpy().astype(np.float64)
        self.n_rows = int(len(self.table))

    @classmethod
    def from_parquet(cls, path: str | Path) -> ExamplesStore:
        import pyarrow.parquet as pq

        path = Path(path)
        schema = pq.read_schema(path)
        cols = [c for c in (*cls.REQUIRED, *cls.OPTIONAL) if c in schema.names]
        return cls(pq.read_table(path, columns=cols), source=str(path))

    def _span(self, latent: int, layer: int) -> tuple[int, int]:
        import numpy as np

        if layer >= self._stride or layer < 0:
            return 0, 0
        key = latent * self._stride + layer
        lo = int(np.searchsorted(self._keys, key, side="left"))
        hi = int(np.searchsorted(self._keys, key, side="right"))
        return lo, hi

    def get(self, latent: int, layer: int, limit: int) -> list[dict[str, Any]]:
        lo, hi = self._span(latent, layer)
        rows = self.table.slice(lo, min(hi - lo, limit)).to_pylist()
        for r in rows:
            r["activation"] = finite(r["activation"])
            r["context_activations"] = [
                None if a is None else finite(a) for a in r["context_activations"]
            ]
        return rows

    def count(self, latent: int, layer: int) -> int:
        lo, hi = self._span(latent, layer)
        return hi - lo

    def max_activation(self, latent: int, layer: int) -> float | None:
        lo, hi = self._span(latent, layer)
        if hi == lo:
            return None
        return float(self._act[lo:hi].max())


# ----- prompt analysis -----------------------------------------------------------------------
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
    recons: torch.Tensor  # [L, P, d] the SAE's reconstruction in input space
    scale: torch.Tensor  # [L, P] standardization std (1 without standardization)
    metrics: list[dict[str, Any]]
    nbytes: int = 0


class Explorer:
    """One MLSAE + its transformer + optional examples, with bounded caches."""

    def __init__(
        self,
        sae: MLSAE,
        transformer: Transformer,
        examples: ExamplesStore | None = None,
        limits: Limits | None = None,
        repo_id: str = "DIR",
        examples_message: str | None = None,
    ) -> None:
        if transformer.d_model != sae.n_inputs:
            raise ValueError(
                f"the MLSAE expects d={sae.n_inputs} inputs but {transformer.name} has "
                f"d_model={transformer.d_model}"
            )
        self.sae = sae.eval()
        self.transformer = transformer
        self.examples = examples
        self.limits = limits or Limits()
        self.repo_id = repo_id
        layers = sae.metadata.get("layers") or list(range(transformer.n_layers))
        self.layers: list[int] = [int(x) for x in layers]
        bad = [x for x in self.layers if not 0 <= x < transformer.n_layers]
        if bad:
            raise ValueError(
                f"the MLSAE's layers {bad} do not exist in {transformer.name} "
                f"({transformer.n_layers} blocks)"
            )
        self.layer_index = {layer: i for i, layer in enumerate(self.layers)}
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens, transformer.max_context)
        self.examples_message = examples_message or (
            None if examples is not None else NO_EXAMPLES_HINT.format(repo=repo_id)
        )
        self.cache = ByteLRU(self.limits.cache_entries, self.limits.cache_bytes)
        self.splices = ByteLRU(self.limits.splice_cache_entries, self.limits.splice_cache_bytes)
        self._compute = threading.Lock()  # one computation at a time: bounded peak memory
        self._device = next(sae.parameters()).device
        self._strings: dict[int, str] = {}
        self.n_analysed = 0  # prompts analysed (cache misses that ran the model)

    # ----- validation --------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        if layer not in self.layer_index:
            raise ExplorerInputError(
                f"layer={layer} is not allowed: the MLSAE was trained on layers {self.layers}"
            )
        return self.layer_index[layer]

    def check_latent(self, latent: int) -> int:
        if not 0 <= latent < self.sae.n_latents:
            raise ExplorerInputError(
                f"latent={latent} is not allowed: the MLSAE has {self.sae.n_latents} latents "
                f"(0..{self.sae.n_latents - 1})"
            )
        return latent

    @staticmethod
    def check_position(position: int, n_tokens: int) -> int:
        if not 0 <= position < n_tokens:
            raise ExplorerInputError(
                f"position={position} is not allowed: the prompt has {n_tokens} tokens "
                f"(positions 0..{n_tokens - 1})"
            )
        return position

    def tokenize(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ExplorerInputError("prompt is empty: type some text")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ExplorerInputError(
                f"prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}"
            )
        ids = self.transformer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ExplorerInputError("prompt has no tokens")
        if len(ids) > self.max_prompt_tokens:
            raise ExplorerInputError(
                f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}"
            )
        return [int(i) for i in ids]

    def strings(self, ids: Sequence[int]) -> list[str]:
        missing = [i for i in set(ids) if i not in self._strings]
        if missing:
            self._strings.update(token_strings(self.transformer.tokenizer, missing))
        return [self._strings[i] for i in ids]

    # ----- the cached analysis of a prompt ---------------------------------------------------
    def prompt_result(self, prompt: str) -> PromptResult:
        ids = self.tokenize(prompt)
        hit = self.cache.get(prompt)
        if hit is not None:
            return hit
        with self._compute:
            hit = self.cache.get(prompt, count=False)  # computed while we waited
            if hit is not None:
                return hit
            result = self._analyse(prompt, ids)
            self.n_analysed += 1
            self.cache.put(prompt, result, result.nbytes)
            return result

    @torch.no_grad()
    def _analyse(self, prompt: str, ids: list[int]) -> PromptResult:
        tf, sae = self.transformer, self.sae
        tokens = torch.tensor([ids], dtype=torch.long)  # [1, P]
        special = torch.tensor([i in tf.special_token_ids for i in ids])  # [P]
        clean = tf.clean_pass(tokens, with_logits=False)
        x = clean.hidden[self.layers, 0].to(self._device)  # [L, P, d]
        out = sae(x)
        keep = (~special).to(self._device)[None, :, None]  # [1, P, 1]
        values = torch.where(keep, out.topk.values, 0.0).float().cpu()  # [L, P, k]
        indices = out.topk.indices.cpu()
        recons = out.recons.float().cpu()  # [L, P, d]
        if out.stats is not None:
            scale = out.stats.std[..., 0].float().cpu()  # [L, P]
        else:
            scale = torch.ones(values.shape[:2])
        metrics = self._metrics(x.cpu(), recons, values, special)
        result = PromptResult(
            prompt=prompt,
            ids=ids,
            tokens=self.strings(ids),
            special=special,
            clean=clean,
            values=values,
            indices=indices,
            recons=recons,
            scale=scale,
            metrics=metrics,
        )
        result.nbytes = (
            _nbytes([clean.hidden, clean.block_kwargs, values, indices, recons, scale])
            + 64 * len(ids)
            + 2 * len(prompt)
        )
        return result

    def _metrics(
        self, x: torch.Tensor, recons: torch.Tensor, values: torch.Tensor, special: torch.Tensor
    ) -> list[dict[str, Any]]:
        """Per SAE layer over the prompt's non-special tokens: FVU, MSE, L0, L1."""
        keep = ~special
        n = int(keep.sum())
        rows = []
        for i, layer in enumerate(self.layers):
            xs = x[i][keep].double()  # [n, d]
            rs = recons[i][keep].double()
            vs = values[i][keep]  # [n, k]
            err = (rs - xs).pow(2).sum()
            var = (xs - xs.mean(0, keepdim=True)).pow(2).sum()
            fvu = float(err / var) if n >= 2 and float(var) > 0 else math.nan
            rows.append(
                {
                    "layer": layer,
                    "fvu": finite(fvu),
                    "mse": finite(err / max(1, xs.numel())) if n else None,
                    "l0": float((vs > self.sae.dead_threshold).sum(-1).double().mean())
                    if n
                    else None,
                    "l1": float(vs.double().sum(-1).mean()) if n else None,
                }
            )
        return rows

    # ----- views ------------------------------------------------------------------------------
    def prompt_view(self, prompt: str) -> dict[str, Any]:
        r = self.prompt_result(prompt)
        mean = {}
        for key in ("fvu", "mse", "l0", "l1"):
            vals = [m[key] for m in r.metrics if m[key] is not None]
            mean[key] = finite(sum(vals) / len(vals)) if vals else None
        return {
            "prompt": r.prompt,
            "n_tokens": len(r.ids),
            "token_ids": r.ids,
            "tokens": r.tokens,
            "special": r.special.tolist(),
            "layers": self.layers,
            "metrics": r.metrics,
            "metrics_mean": mean,
        }

    def _dense(self, r: PromptResult, position: int | None) -> torch.Tensor:
        """[L, n_latents] float64: latent values at `position`, or summed over all tokens."""
        n_layers = len(self.layers)
        dense = torch.zeros(n_layers, self.sae.n_latents, dtype=torch.float64)
        if position is None:
            dense.scatter_add_(1, r.indices.flatten(1), r.values.double().flatten(1))
        else:
            dense.scatter_add_(1, r.indices[:, position], r.values[:, position].double())
        return dense

    def heatmap(
        self, prompt: str, position: int | None, threshold: float, max_latents: int | None = None
    ) -> dict[str, Any]:
        """Latents x layers at one token (or summed over tokens), sorted by mean layer.

        Latents whose largest per-layer value is below `threshold` are dropped; when more
        than `max_latents` remain, those with the largest total are kept. `share` is each
        latent's value normalised over layers; `layer_mean` is in block ids.
        """
        r = self.prompt_result(prompt)
        if position is not None:
            self.check_position(position, len(r.ids))
        cap = min(max_latents or self.limits.max_heatmap_latents, self.limits.max_heatmap_latents)
        dense = self._dense(r, position)  # [L, n]
        above = (dense.max(0).values >= max(threshold, 1e-12)).nonzero().squeeze(-1)  # [m]
        n_above = int(above.numel())
        if n_above > cap:
            totals = dense[:, above].sum(0)
            above = above[torch.topk(totals, cap).indices]
        raw = dense[:, above]  # [L, m]
        share = raw / raw.sum(0, keepdim=True).clamp_min(1e-30)
        block = torch.tensor(self.layers, dtype=torch.float64)[:, None]
        layer_mean = (block * share).sum(0)  # [m]
        order = torch.sort(layer_mean, stable=True).indices
        above, raw, share, layer_mean = (
            above[order],
            raw[:, order],
            share[:, order],
            layer_mean[order],
        )
        return {
            "position": position,
            "threshold": threshold,
            "layers": self.layers,
            "latents": above.tolist(),
            "layer_mean": [finite(v) for v in layer_mean.tolist()],
            "values": [[finite(v) for v in row] for row in raw.tolist()],  # [L][m]
            "share": [[finite(v) for v in row] for row in share.tolist()],  # [L][m]
            "max_value": finite(raw.max()) if raw.numel() else 0.0,
            "n_above_threshold": n_above,
            "truncated": n_above > len(above),
        }

    def latent_activations(self, prompt: str, latent: int, layer: int) -> dict[str, Any]:
        """Latent `latent` on every token at every layer; `values` is the selected layer's row."""
        r = self.prompt_result(prompt)
        self.check_latent(latent)
        li = self.check_layer(layer)
        by_layer = torch.where(r.indices == latent, r.values, 0.0).sum(-1)  # [L, P]
        return {
            "latent": latent,
            "layer": layer,
            "values": [finite(v) for v in by_layer[li].tolist()],
            "by_layer": [[finite(v) for v in row] for row in by_layer.tolist()],
            "layers": self.layers,
            "max_value": finite(by_layer.max()),
        }

    def histograms(self, prompt: str, bins: int, position: int | None) -> dict[str, Any]:
        """Per layer: histogram of the non-zero latent values (shared bin edges)."""
        r = self.prompt_result(prompt)
        values = r.values  # [L, P, k]
        if position is not None:
            self.check_position(position, len(r.ids))
            values = values[:, position : position + 1]
        flat = values.flatten(1)  # [L, P*k]
        fired = flat > self.sae.dead_threshold
        top = float(flat[fired].max()) if bool(fired.any()) else 1.0
        edges = torch.linspace(0.0, top, bins + 1, dtype=torch.float64)
        counts = []
        for i in range(len(self.layers)):
            v = flat[i][fired[i]].double()
            counts.append(torch.histc(v, bins=bins, min=0.0, max=top).long().tolist())
        return {
            "position": position,
            "layers": self.layers,
            "edges": edges.tolist(),
            "counts": counts,  # [L][bins]
            "n_active": fired.sum(1).tolist(),
        }

    def examples_view(self, latent: int, layer: int, limit: int) -> dict[str, Any]:
        self.check_latent(latent)
        self.check_layer(layer)
        if self.examples is None:
            return {
                "latent": latent,
                "layer": layer,
                "available": False,
                "message": self.examples_message,
                "examples": [],
            }
        rows = self.examples.get(latent, layer, min(limit, self.limits.max_examples))
        return {
            "latent": latent,
            "layer": layer,
            "available": True,
            "message": None if rows else "this latent has no examples at this layer",
            "total": self.examples.count(latent, layer),
            "examples": rows,
        }

    # ----- logits --------------------------------------------------------------------------
    def _normed_final(self, r: PromptResult) -> torch.Tensor:
        """[P, d] final-normed hidden of the clean run."""
        with torch.no_grad():
            return self.transformer.final_norm(
                r.clean.hidden[-1, 0].to(self.transformer.device, self.transformer.dtype)
            ).float()

    def _splice(self, r: PromptResult, key: tuple, layer: int, replacement: torch.Tensor):
        hit = self.splices.get(key)
        if hit is not None:
            return hit
        with self._compute:
            hit = self.splices.get(key, count=False)
            if hit is not None:
                return hit
            normed = self.transformer.run_from(r.clean, layer, replacement[None])[0].float().cpu()
            self.splices.put(key, normed, _nbytes(normed) + 256)
            return normed

    def _recons_normed(self, r: PromptResult, layer: int) -> torch.Tensor:
        li = self.layer_index[layer]
        x = r.clean.hidden[layer, 0]  # [P, d]
        repl = torch.where(r.special[:, None], x, r.recons[li])
        return self._splice(r, ("recons", r.prompt, layer), layer, repl)

    def steering_scale(self, r: PromptResult, latent: int, layer: int) -> tuple[float, str]:
        """a_j for mode 'add' (module docstring) and where it came from."""
        li = self.layer_index[layer]
        if self.examples is not None:
            top = self.examples.max_activation(latent, layer)
            if top is not None and top > 0:
                return top, "max-activating examples"
        here = torch.where(r.indices[li] == latent, r.values[li], 0.0)
        if float(here.max()) > 0:
            return float(here.max()), "this prompt"
        nz = r.values[li][r.values[li] > self.sae.dead_threshold]
        if nz.numel():
            return float(nz.mean()), "mean latent value at this layer on this prompt"
        return 1.0, "default 1.0 (no latent fires at this layer)"

    def _steer_normed(
        self, r: PromptResult, latent: int, layer: int, factor: float, mode: str
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        li = self.layer_index[layer]
        v = torch.where(r.indices[li] == latent, r.values[li], 0.0).sum(-1)  # [P]
        info: dict[str, Any] = {"mode": mode, "factor": factor}
        if mode == "scale":
            delta = (factor - 1.0) * v
        else:
            a, source = self.steering_scale(r, latent, layer)
            delta = torch.full_like(v, factor * a)
            info.update(scale=a, scale_source=source)
        delta = torch.where(r.special, 0.0, delta)  # [P]
        column = self.sae.decoder.weight[:, latent].detach().float().cpu()  # [d]
        x = r.clean.hidden[layer, 0]  # [P, d]
        repl = x + (delta * r.scale[li])[:, None] * column[None, :]
        info["delta_norm"] = finite((repl - x).norm(dim=-1).max())
        key = ("steer", r.prompt, layer, latent, float(factor), mode)
        return self._splice(r, key, layer, repl), info

    def _top(self, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        probs = torch.softmax(logits.double(), -1)
        v, i = torch.topk(logits, top_k)
        ids = i.tolist()
        return [
            {"token_id": t, "token": s, "logit": finite(lv), "prob": finite(probs[t])}
            for t, s, lv in zip(ids, self.strings(ids), v.tolist(), strict=True)
        ]

    def _diff(self, new: torch.Tensor, clean: torch.Tensor, top_k: int) -> dict[str, Any]:
        delta = new - clean
        lp_clean = torch.log_softmax(clean.double(), -1)
        lp_new = torch.log_softmax(new.double(), -1)
        kl = float((lp_clean.exp() * (lp_clean - lp_new)).sum())

        def ranked(values: torch.Tensor, sign: float) -> list[dict[str, Any]]:
            v, i = torch.topk(sign * values, top_k)
            ids = i.tolist()
            return [
                {"token_id": t, "token": s, "delta": finite(sign * dv)}
                for t, s, dv in zip(ids, self.strings(ids), v.tolist(), strict=True)
            ]

        return {
            "top": self._top(new, top_k),
            "increases": ranked(delta, 1.0),
            "decreases": ranked(delta, -1.0),
            "kl": finite(max(kl, 0.0)),
            "max_abs_delta": finite(delta.abs().max()),
        }

    def logits_view(
        self,
        prompt: str,
        position: int,
        layer: int,
        latent: int | None,
        factor: float,
        mode: str,
        top_k: int,
    ) -> dict[str, Any]:
        """Top predictions at `position`: clean, with `layer` replaced by its reconstruction,
        and (with a latent) with the latent steered at `layer` (module docstring)."""
        r = self.prompt_result(prompt)
        self.check_position(position, len(r.ids))
        self.check_layer(layer)
        if latent is not None:
            self.check_latent(latent)
        if mode not in STEER_MODES:
            raise ExplorerInputError(f"mode={mode!r} is not allowed: choose from {STEER_MODES}")
        top_k = min(top_k, self.limits.max_top_k, self.transformer.vocab_size)
        tf = self.transformer
        clean = tf.logits(self._normed_final(r)[position]).float().cpu()  # [V]
        recons = tf.logits(self._recons_normed(r, layer)[position]).float().cpu()
        out: dict[str, Any] = {
            "position": position,
            "layer": layer,
            "latent": latent,
            "token": r.tokens[position],
            "clean": {"top": self._top(clean, top_k)},
            "recons": self._diff(recons, clean, top_k),
            "steer": None,
        }
        if latent is not None:
            normed, info = self._steer_normed(r, latent, layer, factor, mode)
            steered = tf.logits(normed[position]).float().cpu()
            out["steer"] = {**info, "latent": latent, **self._diff(steered, clean, top_k)}
        return out

    # ----- about ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        sae, lim = self.sae, self.limits
        meta = sae.metadata
        return {
            "model_name": meta.get("model_name", self.transformer.name),
            "transformer": {
                "name": self.transformer.name,
                "n_layers": self.transformer.n_layers,
                "d_model": self.transformer.d_model,
                "vocab_size": self.transformer.vocab_size,
            },
            "sae": {
                "n_inputs": sae.n_inputs,
                "n_latents": sae.n_latents,
                "k": sae.k,
                "expansion_factor": meta.get("expansion_factor", sae.n_latents // sae.n_inputs),
                "standardize": sae.standardize,
                "dead_threshold": sae.dead_threshold,
                "layers": self.layers,
                "dataset": meta.get("dataset"),
            },
            "examples": {
                "available": self.examples is not None,
                "rows": self.examples.n_rows if self.examples is not None else 0,
                "message": self.examples_message,
            },
            "limits": {
                "max_prompt_chars": lim.max_prompt_chars,
                "max_prompt_tokens": self.max_prompt_tokens,
                "max_factor": lim.max_factor,
                "max_top_k": lim.max_top_k,
                "max_bins": lim.max_bins,
                "max_heatmap_latents": lim.max_heatmap_latents,
                "max_examples": lim.max_examples,
            },
            "steer_modes": list(STEER_MODES),
            "cache": {**self.cache.stats(), "prompts_analysed": self.n_analysed},
            "splice_cache": self.splices.stats(),
        }


def pipeline_layout(directory: Path) -> tuple[Path, str, str] | None:
    """(storage root, model, sae) when `directory` is the pipeline's `<root>/saes/<model>/<sae>`."""
    directory = Path(directory).resolve()
    if len(directory.parts) >= 4 and directory.parent.parent.name == "saes":
        return directory.parent.parent.parent, directory.parent.name, directory.name
    return None


def examples_candidates(directory: Path) -> list[Path]:
    """Where a checkpoint's max_examples table may be, in order of preference.

    1. `<checkpoint>/max_examples.parquet` (written by `mlsae examples` / `mlsae analyse`);
    2. for a checkpoint of the Dagster pipeline (`<root>/saes/<model>/<sae>/`), its
       `max_examples` asset `<root>/tables/max_examples/<model>__<sae>.parquet`.
    """
    out = [Path(directory) / EXAMPLES_FILE]
    layout = pipeline_layout(directory)
    if layout is not None:
        root, model, sae = layout
        out.append(root / "tables" / "max_examples" / f"{model}__{sae}.parquet")
    return out


def load_examples(
    directory: Path, repo_id: str, path: Path | None = None
) -> tuple[ExamplesStore | None, str | None]:
    """The examples table (`path`, else the first of `examples_candidates` that exists), or
    (None, a message saying how to make it)."""
    hint = NO_EXAMPLES_HINT.format(repo=repo_id)
    if path is None:
        path = next((p for p in examples_candidates(directory) if p.is_file()), None)
        if path is None:
            return None, hint
    elif not Path(path).is_file():
        return None, f"{path} does not exist; " + hint
    try:
        return ExamplesStore.from_parquet(path), None
    except Exception as exc:  # noqa: BLE001 - a bad table must not stop the explorer
        logger.warning("cannot read %s: %s", path, exc)
        return None, f"{path} could not be read ({type(exc).__name__}: {exc}); " + hint
