"""The explorer's façade, independent of HTTP: one MLSAE, its transformer and its examples.

A prompt is analysed once (`prompt.analyse_prompt`) and kept in a byte-bounded LRU cache, so
a repeated prompt costs a dictionary lookup and memory never grows without bound. Splices
(reconstruction, steering: `steering`) are cached separately, keeping only the final-normed
hidden states `[P, d]` (logits at a position are one `[d] x [d, vocab]` product away). Every
view validates its parameters and raises `ExplorerInputError` saying what is allowed.
`load_explorer` loads one from a checkpoint, for the server and the dashboard export.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlsae_core.analysis.examples import token_strings
from mlsae_core.checkpoint import resolve_checkpoint
from mlsae_core.config import ConfigError, resolve_device
from mlsae_core.explorer import schemas as sc
from mlsae_core.explorer.cache import ByteLRU, tensor_bytes
from mlsae_core.explorer.examples import NO_EXAMPLES_HINT, ExamplesStore, load_examples
from mlsae_core.explorer.memory import (
    SLACK_BYTES,
    Gate,
    latent_bytes,
    result_bytes,
    working_set_bytes,
)
from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.prompt import PromptResult, analyse_prompt
from mlsae_core.explorer.steering import (
    STEER_MODES,
    SteerMode,
    activation_scale,
    steered_residual,
)
from mlsae_core.explorer.wire import ExplorerInputError, finite
from mlsae_core.layout import StorageLayout
from mlsae_core.lens import TunedLens
from mlsae_core.runs import checkpoint_lens, checkpoint_transformer
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer

logger = logging.getLogger(__name__)


class Explorer:
    """One MLSAE + its transformer + optional examples, with bounded caches."""

    def __init__(
        self,
        sae: MLSAE,
        transformer: Transformer,
        examples: ExamplesStore | None = None,
        settings: ExplorerSettings | None = None,
        repo_id: str = "DIR",
        examples_message: str | None = None,
        lens: TunedLens | None = None,
        run_dir: Path | None = None,
    ) -> None:
        if transformer.d_model != sae.n_inputs:
            raise ValueError(
                f"the MLSAE expects d={sae.n_inputs} inputs but {transformer.name} has "
                f"d_model={transformer.d_model}"
            )
        self.sae = sae.eval()
        self.transformer = transformer
        self.lens = lens  # the tuned lens the MLSAE was trained through, if any
        self.run_dir = run_dir  # the run directory whose tables the latent pages read
        self.examples = examples
        self.settings = settings or ExplorerSettings()
        layers = sae.metadata.get("layers") or list(range(transformer.n_layers))
        self.layers: list[int] = [int(x) for x in layers]
        bad = [x for x in self.layers if not 0 <= x < transformer.n_layers]
        if bad:
            raise ValueError(
                f"the MLSAE's layers {bad} do not exist in {transformer.name} "
                f"({transformer.n_layers} blocks)"
            )
        self.layer_index = {layer: i for i, layer in enumerate(self.layers)}
        self.max_prompt_tokens = min(self.settings.max_prompt_tokens, transformer.max_context)
        self.examples_message = examples_message or (
            None if examples is not None else NO_EXAMPLES_HINT.format(repo=repo_id)
        )
        self.cache = ByteLRU(self.settings.cache_entries, self.settings.cache_bytes)
        self.splices = ByteLRU(self.settings.splice_cache_entries, self.settings.splice_cache_bytes)
        self.compute_lock = threading.Lock()  # one model computation at a time
        # every API request runs through the gate: `workers` at once, `max_queue` waiting
        self.gate = Gate(self.settings.workers, self.settings.max_queue)
        self._strings: dict[int, str] = {}
        self.n_analysed = 0  # prompts analysed (cache misses that ran the model)

    # ----- validation --------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        if layer not in self.layer_index:
            raise ExplorerInputError(
                f"layer={layer} is not allowed: the MLSAE was trained on layers {self.layers}"
            )
        return self.layer_index[layer]

    def check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.sae.n_latents:
            raise ExplorerInputError(
                f"latent={latent} is not allowed: the MLSAE has {self.sae.n_latents} latents "
                f"(0..{self.sae.n_latents - 1})"
            )

    def tokenize(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise ExplorerInputError("prompt is empty: type some text")
        if len(prompt) > self.settings.max_prompt_chars:
            raise ExplorerInputError(
                f"prompt has {len(prompt)} characters; the limit is {self.settings.max_prompt_chars}"
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
    def prompt_result(self, prompt: str, position: int | None = None) -> PromptResult:
        """The analysis of `prompt`, cached; `position`, when given, must be one of its tokens."""
        ids = self.tokenize(prompt)

        def analyse() -> tuple[PromptResult, int]:
            tokens = self.strings(ids)
            r = analyse_prompt(
                self.transformer, self.sae, self.layers, prompt, ids, tokens, self.lens
            )
            self.n_analysed += 1
            return r, r.nbytes

        r = self.cache.get_or_compute(prompt, analyse, self.compute_lock)
        if position is not None and not 0 <= position < len(ids):
            raise ExplorerInputError(
                f"position={position} is not allowed: the prompt has {len(ids)} tokens "
                f"(positions 0..{len(ids) - 1})"
            )
        return r

    # ----- views ------------------------------------------------------------------------------
    def prompt_view(self, prompt: str) -> dict[str, Any]:
        r = self.prompt_result(prompt)
        mean = {}
        for key in ("fvu", "fvu_nofirst", "first_share", "mse", "l0", "l1"):
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

    def heatmap(
        self, prompt: str, position: int | None, threshold: float, max_latents: int | None = None
    ) -> dict[str, Any]:
        """Latents x layers at one token (or summed over tokens), sorted by mean layer.

        Latents whose largest per-layer value is below `threshold` are dropped; when more
        than `max_latents` remain, those with the largest total are kept. `share` is each
        latent's value normalised over layers; `layer_mean` is in block ids.
        """
        r = self.prompt_result(prompt, position)
        cap = min(
            max_latents or self.settings.max_heatmap_latents, self.settings.max_heatmap_latents
        )
        at = slice(None) if position is None else slice(position, position + 1)  # or all tokens
        dense = torch.zeros(len(self.layers), self.sae.n_latents, dtype=torch.float64)  # [L, n]
        dense.scatter_add_(1, r.indices[:, at].flatten(1), r.values[:, at].double().flatten(1))
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
        above, layer_mean = above[order], layer_mean[order]
        raw, share = raw[:, order], share[:, order]
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
        if not 1 <= bins <= self.settings.max_bins:
            raise ExplorerInputError(f"bins={bins} is not allowed: 1..{self.settings.max_bins}")
        r = self.prompt_result(prompt, position)
        values = r.values  # [L, P, k]
        if position is not None:
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
        out = {"latent": latent, "layer": layer, "available": self.examples is not None}
        if self.examples is None:
            return {**out, "message": self.examples_message, "examples": []}
        rows = self.examples.get(latent, layer, min(limit, self.settings.max_examples))
        return {
            **out,
            "message": None if rows else "this latent has no examples at this layer",
            "total": self.examples.count(latent, layer),
            "examples": rows,
        }

    # ----- logits --------------------------------------------------------------------------
    def _splice(
        self, r: PromptResult, key: tuple, layer: int, replacement: torch.Tensor
    ) -> torch.Tensor:
        """[P, d] final-normed hidden with block `layer` replaced (cached; one at a time)."""

        def splice() -> tuple[torch.Tensor, int]:
            normed = self.transformer.run_from(r.clean, layer, replacement[None])[0].float().cpu()
            return normed, tensor_bytes(normed) + 256

        return self.splices.get_or_compute(key, splice, self.compute_lock)

    def _steer_normed(
        self, r: PromptResult, latent: int, layer: int, factor: float, mode: SteerMode
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        info: dict[str, Any] = {"mode": mode, "factor": factor}
        li, a = self.layer_index[layer], 1.0
        if mode == "add":  # a_j (`steering.activation_scale`) and where it came from
            top = None if self.examples is None else self.examples.max_activation(latent, layer)
            a, source = activation_scale(r, li, latent, top, self.sae.dead_threshold)
            info.update(scale=a, scale_source=source)
        column = self.sae.decoder.weight[:, latent].detach().float()  # [d]
        if self.lens is not None:  # a direction in the lens's space -> the model's
            column = self.lens.inverse_direction(column, layer)
        repl = steered_residual(r, layer, li, latent, column.cpu(), factor, mode, a)
        x = r.clean.hidden[layer, 0]  # [P, d]
        info["delta_norm"] = finite((repl - x).norm(dim=-1).max())
        key = ("steer", r.prompt, layer, latent, float(factor), mode)
        return self._splice(r, key, layer, repl), info

    def _tokens(self, ids: torch.Tensor, **columns: torch.Tensor) -> list[dict[str, Any]]:
        """One row per token id: the id, its text and each column's value there."""
        token_ids, values = ids.tolist(), {k: v.tolist() for k, v in columns.items()}
        return [
            {"token_id": t, "token": s, **{k: finite(v[n]) for k, v in values.items()}}
            for n, (t, s) in enumerate(zip(token_ids, self.strings(token_ids), strict=True))
        ]

    def _top(self, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        v, i = torch.topk(logits, top_k)
        return self._tokens(i, logit=v, prob=torch.softmax(logits.double(), -1)[i])

    def _diff(self, new: torch.Tensor, clean: torch.Tensor, top_k: int) -> dict[str, Any]:
        delta = new - clean
        lp_clean = torch.log_softmax(clean.double(), -1)
        lp_new = torch.log_softmax(new.double(), -1)
        kl = float((lp_clean.exp() * (lp_clean - lp_new)).sum())
        up, down = torch.topk(delta, top_k), torch.topk(-delta, top_k)
        return {
            "top": self._top(new, top_k),
            "increases": self._tokens(up.indices, delta=up.values),
            "decreases": self._tokens(down.indices, delta=-down.values),
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
        mode: SteerMode,
        top_k: int,
    ) -> dict[str, Any]:
        """Top predictions at `position`: clean, with `layer` replaced by its reconstruction,
        and (with a latent) with the latent steered at `layer` (`steering`)."""
        if abs(factor) > self.settings.max_factor:
            raise ExplorerInputError(
                f"factor={factor} is not allowed: |factor| <= {self.settings.max_factor}"
            )
        r = self.prompt_result(prompt, position)
        self.check_layer(layer)
        if latent is not None:
            self.check_latent(latent)
        top_k = min(top_k, self.settings.max_top_k, self.transformer.vocab_size)
        tf = self.transformer
        with torch.no_grad():  # [P, d] final-normed hidden of the clean run
            final = tf.final_norm(r.clean.hidden[-1, 0].to(tf.device, tf.dtype)).float()
        x = r.clean.hidden[layer, 0]  # [P, d]
        repl = torch.where(r.special[:, None], x, r.recons[self.layer_index[layer]])
        spliced = self._splice(r, ("recons", r.prompt, layer), layer, repl)
        clean, recons = (tf.logits(h[position]).float().cpu() for h in (final, spliced))  # [V]
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
    def memory_bound(self) -> dict[str, int]:
        """Bytes above idle that RSS stays under (docs/explorer.md): the caches' real bound
        and the latent pages' data, `workers` requests' working sets at the longest prompt (or
        a latent page's, if larger), and a fixed slack."""
        lim, tf, sae = self.settings, self.transformer, self.sae
        p, n_layers = self.max_prompt_tokens, len(self.layers)
        one = result_bytes(tf.n_layers, n_layers, p, tf.d_model, sae.k)
        splice = p * tf.d_model * 4 + 256
        caches = min(lim.cache_bytes, lim.cache_entries * one) + min(
            lim.splice_cache_bytes, lim.splice_cache_entries * splice
        )
        work = working_set_bytes(
            tf.n_layers, n_layers, p, tf.d_model, sae.k, sae.n_latents, tf.vocab_size
        )
        # the latent pages' held-out sample (rows of at most p tokens, the last one padded)
        kept, page = latent_bytes(n_layers, lim.latent_tokens + p, sae.k, sae.n_latents)
        caches, work = caches + kept, max(work, page)
        return {
            "caches_bytes": caches,
            "working_set_bytes": work,
            "slack_bytes": SLACK_BYTES,
            "bound_bytes": caches + lim.workers * work + SLACK_BYTES,
        }

    def info(self) -> dict[str, Any]:
        """/api/info; `transformer` and `limits` are the attributes their schemas name."""
        sae, lim, tf = self.sae, self.settings, self.transformer
        meta = sae.metadata
        return {
            "model_name": meta.get("model_name", tf.name),
            "transformer": {name: getattr(tf, name) for name in sc.TransformerInfo.model_fields},
            "sae": {
                **{n: getattr(sae, n) for n in ("n_inputs", "n_latents", "k", "standardize")},
                "expansion_factor": meta.get("expansion_factor", sae.n_latents // sae.n_inputs),
                "dead_threshold": sae.dead_threshold,
                "layers": self.layers,
                "dataset": meta.get("dataset"),
                "tuned_lens": self.lens is not None,
            },
            "examples": {
                "available": self.examples is not None,
                "rows": self.examples.n_rows if self.examples is not None else 0,
                "message": self.examples_message,
            },
            "limits": {
                **{name: getattr(lim, name) for name in sc.Limits.model_fields},
                "max_prompt_tokens": self.max_prompt_tokens,  # capped by the model's context
            },
            "steer_modes": list(STEER_MODES),
            "cache": {**self.cache.stats(), "prompts_analysed": self.n_analysed},
            "splice_cache": self.splices.stats(),
            "memory": {**self.memory_bound(), **self.gate.stats()},
        }


# ----- loading a checkpoint ------------------------------------------------------------------
def _moved_model(name: str, directory: Path) -> str:
    """The checkpoint's model as the storage root that holds the checkpoint has it: the
    recorded path if it still exists, else `<root>/models/<its name>` or `<root>/models/<model>`
    (a moved or copied root, or a model key that the root, not $MLSAE_DATA_DIR, resolves)."""
    found = StorageLayout.containing(directory)
    if Path(name).expanduser().exists() or found is None:
        return name
    layout, model, _ = found
    for moved in (layout.model_dir(Path(name).name), layout.model_dir(model)):
        if (moved / "config.json").is_file():
            logger.info("model %s: using %s", name, moved)
            return str(moved)
    return name


def load_explorer(repo_id: str, settings: ExplorerSettings | None = None) -> Explorer:
    """Load the MLSAE, its transformer and the examples beside the checkpoint, once.

    The transformer is the checkpoint's `model_name` (or `settings.model_name`), found in
    the storage root when it has moved (`_moved_model`). Examples: `settings.examples`, else
    the run directory's `max_examples.parquet`.
    """
    settings = settings or ExplorerSettings()
    device = resolve_device(settings.device)
    directory = resolve_checkpoint(repo_id)
    sae = MLSAE.from_pretrained(directory, device=device)
    name = settings.model_name or sae.metadata.get("model_name")
    if not name:
        raise ConfigError(
            f"{repo_id}: config.json does not say which model it was trained on (model_name); "
            "pass --model_name"
        )
    name = _moved_model(str(name), directory)
    logger.info("loading transformer %s", name)
    transformer = checkpoint_transformer(directory, sae, name, device)
    lens = checkpoint_lens(repo_id, sae.metadata, transformer, settings.tuned_lens)
    examples, message = load_examples(directory, repo_id, settings.examples)
    if examples is None:
        logger.info("%s", message)
    else:
        logger.info("loaded %d max-activating examples from %s", examples.n_rows, examples.source)
    return Explorer(
        sae, transformer, examples, settings, repo_id, message, lens, run_dir=Path(directory)
    )
