"""A tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine translator per layer.

Layer l's translator is T_l(h) = h + h A_l^T + b_l on block l's output, initialised to the
identity (the logit lens); the prediction is the model's own head on the final norm of T_l(h_l).
The last layer's state is already the final one, so its translator stays the identity. Training
minimises KL(model's output || lens), summed over layers, averaged over counted positions.

Saved as `lens.safetensors` + `config.json`, both recorded in the manifest and verified on load.
`TunedLens.load` also reads the `tuned-lens` package's layout (config.json + params.pt, without a
manifest, unpickled only with `weights_only=True`; see `from_state_dict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from mlsae_core import atomic
from mlsae_core.config import LensConfig
from mlsae_core.transformer import Transformer

logger = logging.getLogger(__name__)

LENS_FORMAT = "mlsae-tuned-lens"
WEIGHTS_NAME = "lens.safetensors"
CONFIG_NAME = "config.json"
PACKAGE_PARAMS = "params.pt"  # the tuned-lens package's weights file
PACKAGE_LENS_TYPE = "linear_tuned_lens"
_FORWARD_ROWS = 4  # sequences per no-grad forward while caching block outputs
_EVAL_ROWS = 256  # positions per head evaluation in lens_kl (bounds the [rows, V] tensors)


class LensError(ValueError):
    """A lens is missing, corrupt, or does not fit the model it is used with."""


def _ints(config: dict[str, Any], keys: tuple[str, ...], where: Path) -> list[int]:
    """The integer settings `keys` of a lens's config.json, or a LensError naming them."""
    try:
        return [int(config[key]) for key in keys]
    except (KeyError, TypeError, ValueError) as exc:
        raise LensError(f"{where} lacks integer {'/'.join(keys)} ({exc})") from exc


class TunedLens(nn.Module):
    """Affine translators `weight` (A, [n_layers, d, d]) and `bias` (b, [n_layers, d])."""

    def __init__(self, n_layers: int, d_model: int, model_name: str = "custom") -> None:
        super().__init__()
        if n_layers < 1 or d_model < 1:
            raise LensError(
                f"a lens needs n_layers >= 1 and d_model >= 1, got {n_layers}, {d_model}"
            )
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.model_name = model_name
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))
        self.settings: dict[str, Any] | None = None  # the LensConfig it was trained with
        self.kl_table: list[dict[str, float]] | None = None  # lens_kl rows, if measured
        self._inverse_key: tuple | None = None
        self._inverse: torch.Tensor | None = None  # float64 (I + A)^-1, [n_layers, d, d]

    def _layers(self, layers: Sequence[int] | None, n: int) -> torch.Tensor:
        idx = list(range(self.n_layers)) if layers is None else [int(i) for i in layers]
        if len(idx) != n:
            raise LensError(f"{len(idx)} layers given for a first axis of length {n}")
        bad = [i for i in idx if not 0 <= i < self.n_layers]
        if bad:
            raise LensError(
                f"layers {bad} out of range: the lens has layers 0..{self.n_layers - 1}"
            )
        return torch.tensor(idx, dtype=torch.long, device=self.weight.device)

    def transform(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """T_l(x) for x `[len(layers), ..., d]` whose first axis holds block outputs of `layers`
        (default: every layer), in x's dtype."""
        idx = self._layers(layers, x.shape[0])
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        a = self.weight[idx].to(flat.dtype)
        b = self.bias[idx].to(flat.dtype)
        out = flat + torch.baddbmm(b[:, None, :], flat, a.transpose(1, 2))
        return out.reshape(x.shape)

    def _inverses(self) -> torch.Tensor:
        """(I + A_l)^-1 for every layer, in float64, recomputed only when the weights change."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.shape)
        if self._inverse is None or self._inverse_key != key:
            eye = torch.eye(self.d_model, dtype=torch.float64, device=w.device)
            self._inverse = torch.linalg.inv(eye + w.detach().double())
            self._inverse_key = key
        return self._inverse

    def inverse(self, h: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """The exact inverse of `transform`: (I + A_l)^-1 (h - b_l), applied in h's dtype."""
        idx = self._layers(layers, h.shape[0])
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        inv = self._inverses()[idx].to(flat.dtype)
        centred = flat - self.bias.detach()[idx].to(flat.dtype)[:, None, :]
        return torch.bmm(centred, inv.transpose(1, 2)).reshape(h.shape)

    def inverse_direction(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """(I + A_l)^-1 v: a direction (a difference of states) in the lens's space at `layer`,
        in the model's space. The bias cancels from a difference, so a zero step stays zero."""
        self._layers([layer], 1)
        inv = self._inverses()[int(layer)].to(device=v.device, dtype=v.dtype)
        return v @ inv.T

    def fingerprint(self) -> str:
        """sha256 hex of the weights (float32 A then b, C order): equal iff the lens is."""
        h = hashlib.sha256()
        for t in (self.weight, self.bias):
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """lens.safetensors then config.json, each atomically, both recorded in the manifest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.detach().to("cpu", torch.float32).contiguous(),
            "bias": self.bias.detach().to("cpu", torch.float32).contiguous(),
        }
        with atomic.atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "lens_format": LENS_FORMAT})
        config = {
            "format": LENS_FORMAT,
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "settings": self.settings,
            "kl": self.kl_table,
            "fingerprint": self.fingerprint(),
        }
        atomic.write_json(directory / CONFIG_NAME, config)
        atomic.record(directory, [WEIGHTS_NAME, CONFIG_NAME])
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, n_layers: int | None = None, d_model: int | None = None
    ) -> TunedLens:
        """Our layout (lens.safetensors + config.json) or the tuned-lens package's (params.pt +
        config.json); `n_layers`/`d_model` (the model's) are checked when given."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not directory.is_dir():
            raise LensError(
                f"lens directory {directory} does not exist; train one with mlsae lens train"
            )
        if not cfg_path.is_file():
            raise LensError(
                f"{cfg_path} is missing: not a lens directory (mlsae lens train writes one)"
            )
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise LensError(
                f"{cfg_path} is not valid JSON ({exc}); restore it or retrain the lens"
            ) from exc
        if not isinstance(config, dict):
            raise LensError(f"{cfg_path} is not a JSON object; restore it or retrain the lens")
        if config.get("format") == LENS_FORMAT:
            lens = cls._load_ours(directory, config)
        elif "lens_type" in config or (directory / PACKAGE_PARAMS).is_file():
            lens = cls._load_package(directory, config)
        else:
            raise LensError(
                f"{cfg_path} has neither format={LENS_FORMAT!r} nor a tuned-lens package "
                "lens_type: not a lens directory"
            )
        lens._check_shape(directory, n_layers, d_model)
        return lens

    def _check_shape(self, where: Any, n_layers: int | None, d_model: int | None) -> None:
        if (n_layers is not None and n_layers != self.n_layers) or (
            d_model is not None and d_model != self.d_model
        ):
            raise LensError(
                f"lens {where} was trained for {self.n_layers} layers of width {self.d_model}; "
                f"the model has {n_layers} layers of width {d_model}: use a lens trained for it"
            )

    def check_fits(self, transformer: Transformer, where: Any = "") -> None:
        """Refuse a lens whose shape differs from `transformer`'s (one-line message)."""
        self._check_shape(where or self.model_name, transformer.n_layers, transformer.d_model)

    @classmethod
    def _load_ours(cls, directory: Path, config: dict[str, Any]) -> TunedLens:
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise LensError(f"{weights} is missing; retrain the lens or restore the file")
        n_layers, d_model = _ints(config, ("n_layers", "d_model"), directory / CONFIG_NAME)
        try:
            atomic.verify(directory, [CONFIG_NAME, WEIGHTS_NAME])
        except atomic.CorruptFileError as exc:
            raise LensError(f"{exc} (retrain the lens)") from exc
        try:
            tensors = load_bytes(weights.read_bytes())
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise LensError(f"{weights} is corrupt ({exc}); retrain or restore it") from exc
        lens = cls(n_layers, d_model, str(config.get("model_name", "custom")))
        lens._copy(tensors.get("weight"), tensors.get("bias"), weights)
        lens.settings = config.get("settings")
        lens.kl_table = config.get("kl")
        return lens

    @classmethod
    def _load_package(cls, directory: Path, config: dict[str, Any]) -> TunedLens:
        params = directory / PACKAGE_PARAMS
        lens_type = config.get("lens_type", PACKAGE_LENS_TYPE)
        if lens_type != PACKAGE_LENS_TYPE:
            raise LensError(
                f"{directory}: lens_type={lens_type!r} is not supported, only {PACKAGE_LENS_TYPE!r}"
            )
        if not params.is_file():
            raise LensError(f"{params} is missing; restore the tuned-lens package's weights file")
        n_hidden, d_model = _ints(config, ("num_hidden_layers", "d_model"), directory / CONFIG_NAME)
        try:
            state = torch.load(params, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same
            raise LensError(
                f"{params} is not a plain tensor state dict (refused by weights_only=True: "
                f"{str(exc).splitlines()[0][:200]}); only tensors are ever unpickled"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise LensError(f"{params} is not a state dict of tensors; not a tuned-lens checkpoint")
        if not config.get("bias", True) and any(k.endswith(".bias") for k in state):
            raise LensError(f"{params} has biases but its config.json says bias=false")
        name = str(config.get("base_model_name_or_path") or "custom")
        return cls.from_state_dict(
            state, n_layers=n_hidden, d_model=d_model, index_offset=1, model_name=name, where=params
        )

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str = "",
        index_offset: int = 0,
        n_layers: int | None = None,
        d_model: int | None = None,
        model_name: str = "custom",
        where: Any = "state dict",
    ) -> TunedLens:
        """A lens from `{prefix}{i}.weight` / `.bias` tensors (T(h) = h + Linear(h)), translator i
        going to our layer i - index_offset: 1 for the tuned-lens package (its translator 0 is
        the embeddings', dropped), 0 for the original code's "-tfm" checkpoints. Every layer but
        the last needs a weight; biases are optional; other names under `prefix` are refused.
        """
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(weight|bias)$")
        found: dict[tuple[int, str], torch.Tensor] = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            m = pattern.match(key)
            if m is None:
                raise LensError(
                    f"{where}: unexpected tensor {key!r} (want {prefix}<i>.weight/.bias)"
                )
            found[(int(m.group(1)), m.group(2))] = value
        if not found:
            raise LensError(f"{where} has no {prefix}<i>.weight tensors: not a tuned lens")
        indices = sorted({i for i, _ in found})
        if n_layers is None:
            n_layers = max(indices) - index_offset + 1 + (index_offset > 0)
        if d_model is None:
            first = next(v for (_, kind), v in found.items() if kind == "weight")
            d_model = int(first.shape[-1])
        top = n_layers - 1 + index_offset
        extra = [i for i in indices if i < index_offset - 1 or i > top]
        # index_offset - 1 .. below our layer 0 (the package's embedding translator) is dropped
        if extra:
            raise LensError(
                f"{where}: translators {extra} do not map onto layers 0..{n_layers - 1} "
                f"(index offset {index_offset})"
            )
        lens = cls(n_layers, d_model, model_name)
        out = {
            "weight": torch.zeros(n_layers, d_model, d_model),
            "bias": torch.zeros(n_layers, d_model),
        }
        for layer in range(n_layers):
            i = layer + index_offset
            if (i, "weight") not in found:
                if layer == n_layers - 1:
                    continue  # the last layer: identity
                raise LensError(
                    f"{where} lacks {prefix}{i}.weight (the translator of layer {layer})"
                )
            for kind, into in out.items():
                t, want = found.get((i, kind)), tuple(into.shape[1:])
                if t is not None and tuple(t.shape) != want:
                    raise LensError(
                        f"{where}: {prefix}{i}.{kind} has shape {tuple(t.shape)}, want {want}"
                    )
                if t is not None:
                    into[layer] = t.float()
        lens._copy(out["weight"], out["bias"], where)
        return lens

    @torch.no_grad()
    def _copy(self, weight: torch.Tensor | None, bias: torch.Tensor | None, where: Any) -> None:
        want = {
            "weight": (self.n_layers, self.d_model, self.d_model),
            "bias": (self.n_layers, self.d_model),
        }
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None or tuple(t.shape) != want[name]:
                got = None if t is None else tuple(t.shape)
                raise LensError(f"{where}: tensor {name} has shape {got}, want {want[name]}")
            if not torch.isfinite(t).all():
                raise LensError(f"{where}: tensor {name} contains NaN or Inf")
        self.weight.copy_(weight)
        self.bias.copy_(bias)


# --------------------------------------------------------------------------- the head


def _counted_states(
    transformer: Transformer, tokens: torch.Tensor, masks: torch.Tensor, max_tokens: int | None
) -> torch.Tensor:
    """Block outputs `[n, n_layers, d]` (float32, CPU) at the first `max_tokens` counted
    positions."""
    if tokens.shape != masks.shape or tokens.ndim != 2:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and masks {tuple(masks.shape)} must both be [rows, positions]"
        )
    parts: list[torch.Tensor] = []
    have = 0
    for start in range(0, tokens.shape[0], _FORWARD_ROWS):
        if max_tokens is not None and have >= max_tokens:
            break
        rows = slice(start, start + _FORWARD_ROWS)
        mask = masks[rows].bool()
        if not mask.any():
            continue
        hidden = transformer.activations(tokens[rows])  # [L, b, p, d]
        states = hidden[:, mask.to(hidden.device)].transpose(0, 1).float().cpu()  # [n, L, d]
        parts.append(states)
        have += states.shape[0]
    if not parts:
        raise ValueError(
            "no counted positions (every token is BOS/EOS/PAD): nothing to fit or measure"
        )
    out = torch.cat(parts)
    return out[:max_tokens] if max_tokens is not None else out


# --------------------------------------------------------------------------- training


class _FusedKL:
    """KL(p || softmax(z)) and its gradient softmax(z) - p for a linear head z = s (W n + c), by
    hand: on a CPU autograd's chain (log_softmax, its backward, casts) costs more than the GEMMs."""

    def __init__(self, transformer: Transformer, dtype: torch.dtype) -> None:
        unembed = transformer.unembed
        self.weight = unembed.weight.detach().to(dtype)
        self.bias = None if unembed.bias is None else unembed.bias.detach().float()
        self.scale = transformer.head.scale
        self.dtype = dtype

    def backward(
        self, normed: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor
    ) -> torch.Tensor:
        """Backpropagate the mean KL over rows into `normed`'s graph; return that mean."""
        b = normed.shape[0]
        with torch.no_grad():
            z = F.linear(normed.detach().to(self.dtype), self.weight).float()
            if self.bias is not None:
                z += self.bias
            if self.scale != 1.0:
                z *= self.scale
            lse = torch.logsumexp(z, dim=-1)
            kl = (neg_entropy - (p * z).sum(-1) + lse).mean()
            z.sub_(lse[:, None]).exp_().sub_(p)  # softmax(z) - p
            grad = (z.to(self.dtype) @ self.weight).float() * (self.scale / b)
        normed.backward(grad.to(normed.dtype))
        return kl


def train_lens(
    transformer: Transformer,
    tokens: torch.Tensor,
    masks: torch.Tensor,
    cfg: LensConfig,
    progress: bool = True,
) -> TunedLens:
    """Fit a tuned lens on the counted positions of `tokens` (deterministic given cfg.seed):
    block outputs cached once; each step, `batch_size` of them (seeded permutations) and, layer
    by layer, KL(final || lens) backpropagated into its translator; AdamW, linear decay to 0."""
    from tqdm.auto import tqdm

    from mlsae_core.precision import resolve_precision

    device = transformer.device
    head_dtype = resolve_precision(cfg.head_dtype, device, "head_dtype")
    cache = _counted_states(transformer, tokens, masks, cfg.max_tokens)  # [n, L, d]
    n, n_layers, d = cache.shape
    lens = TunedLens(n_layers, d, transformer.name).to(device)
    lens.settings = dataclasses.asdict(cfg)
    trained = list(range(n_layers - 1))
    if not trained:
        return lens  # one block: its output is the final state; nothing to learn
    fused = _FusedKL(transformer, head_dtype) if transformer.linear_head else None
    params = [lens.weight, lens.bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)
    at = 0
    bar = tqdm(range(cfg.steps), desc="tuned lens", disable=not progress)
    for _ in bar:
        if at + cfg.batch_size > n and at > 0:
            order, at = torch.randperm(n, generator=gen), 0
        idx = order[at : at + cfg.batch_size]
        at += len(idx)
        batch = cache[idx].to(device)  # [b, L, d]
        with torch.no_grad():
            target = torch.log_softmax(
                transformer.head_logits(transformer.final_norm(batch[:, -1])).float(), dim=-1
            )  # float32: the model's own output distribution
            p = target.exp()
            neg_entropy = (p * target).sum(-1)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for layer in trained:
            h = batch[:, layer]
            normed = transformer.final_norm(h + h @ lens.weight[layer].T + lens.bias[layer])
            if fused is not None:
                kl = fused.backward(normed, p, neg_entropy)
            else:
                logq = torch.log_softmax(
                    transformer.head_logits(normed, head_dtype).float(), dim=-1
                )
                kl = (p * (target - logq)).sum(-1).mean()
                kl.backward()  # per layer, so one [b, V] graph is alive at a time
            total += float(kl.detach())
        if not math.isfinite(total):
            raise FloatingPointError(
                f"tuned-lens training diverged (KL {total}); lower --lr (now {cfg.lr})"
            )
        opt.step()
        sched.step()
        with torch.no_grad():  # the last layer stays the identity
            lens.weight[-1].zero_()
            lens.bias[-1].zero_()
        bar.set_postfix(kl_per_layer=f"{total / len(trained):.4f}")
    lens.requires_grad_(False)
    return lens.cpu() if device.type != "cpu" else lens


# --------------------------------------------------------------------------- measuring


def lens_kl(
    transformer: Transformer,
    lens: TunedLens,
    tokens: torch.Tensor,
    masks: torch.Tensor,
    max_tokens: int | None = None,
) -> list[dict[str, float]]:
    """Per layer, KL(final || logit lens) and KL(final || tuned lens) in nats, the mean over
    the first `max_tokens` counted positions (float32 head, float64 softmax and sums)."""
    lens.check_fits(transformer)
    cache = _counted_states(transformer, tokens, masks, max_tokens)  # [n, L, d]
    n, n_layers, _ = cache.shape
    sums = torch.zeros(2, n_layers, dtype=torch.float64)
    lens = lens.to(transformer.device)
    with torch.no_grad():
        for start in range(0, n, _EVAL_ROWS):
            batch = cache[start : start + _EVAL_ROWS].to(transformer.device).transpose(0, 1)
            final = transformer.logits(transformer.final_norm(batch[-1])).double()
            logp = torch.log_softmax(final, dim=-1)
            p = logp.exp()
            neg_entropy = (p * logp).sum(-1)
            del final, logp
            tuned = lens.transform(batch)
            for layer in range(n_layers):
                for which, h in enumerate((batch[layer], tuned[layer])):
                    z = transformer.logits(transformer.final_norm(h)).double()
                    # KL = sum p log p - sum p z + logsumexp z (log q = z - logsumexp z)
                    kl = neg_entropy - torch.einsum("bv,bv->b", p, z) + torch.logsumexp(z, -1)
                    sums[which, layer] += kl.sum().cpu()
    means = (sums / n).tolist()
    return [
        {"layer": layer, "kl_logit_lens": means[0][layer], "kl_tuned_lens": means[1][layer]}
        for layer in range(n_layers)
    ]


def fit_lens(
    transformer: Transformer,
    train_chunks: Any,
    test_chunks: Any,
    cfg: LensConfig,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> TunedLens:
    """`train_lens` on the training chunks, then `lens_kl` on up to cfg.eval_tokens test
    chunks, both recorded on the lens (settings, kl_table) for its config.json. The one path
    of `mlsae lens train` and the pipeline's tuned_lens asset."""
    lens = train_lens(transformer, train_chunks.tokens, train_chunks.mask(), cfg, progress)
    lens.kl_table = lens_kl(
        transformer, lens, test_chunks.tokens, test_chunks.mask(), cfg.eval_tokens
    )
    lens.settings = {**dataclasses.asdict(cfg), **(settings or {})}
    return lens


class LensedActivations:
    """An `ActivationSource` through a tuned lens: T_l of another source's block outputs, in
    float32 whatever autocast is in force (mixed precision covers the forward, not the lens)."""

    def __init__(self, source: Any, lens: TunedLens, layers: Sequence[int]) -> None:
        self.source, self.lens, self.layers = source, lens, [int(x) for x in layers]
        self.n_layers, self.d_model = source.n_layers, source.d_model

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        acts = self.source(rows)
        with torch.autocast(device_type=acts.device.type, enabled=False):
            lens = self.lens.to(acts.device)
            return lens.transform(acts.float(), self.layers)
