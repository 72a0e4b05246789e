"""The multi-layer sparse autoencoder (SPEC section 3): one TopK dictionary for every layer.

Inputs are residual-stream vectors from any number of layers, `[n_layers, *tokens, d]` or
flattened `[N, d]`; every vector is an independent example for the same dictionary. The
public names follow the original code (`MLSAE`, `TopK`, `AutoencoderOutput`, `encode`,
`decode`, `forward`, `from_pretrained`) so its users feel at home.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mlsae_core import atomic
from mlsae_core.sparse import gathered_preacts, selected_preacts, sparse_decode

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
EMBEDDED_CONFIG_KEY = "mlsae_config"
CONFIG_NAME = "config.json"
STD_EPS = 1e-5
# Rows of pre-activations computed at once: bounds the dense [rows, n_latents] buffer.
ENCODE_CHUNK_ELEMENTS = 1 << 26


# ----- mixed precision ---------------------------------------------------------------------
_AUTOCAST: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "mlsae_autocast", default=None
)
_AUTOCAST_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def mixed_precision(dtype: torch.dtype | str | None = torch.bfloat16) -> Iterator[None]:
    """Inside this block `train()` and `evaluate()` run the transformer and the encoder GEMM
    under `torch.autocast(dtype)` (bf16 by default; None turns it off).

    The TopK *selection* then uses low-precision pre-activations, but the k selected values,
    the decode, the losses, the weights and the optimiser stay float32. Meant for CUDA; on
    CPU it is honoured as well (CPU autocast) so the same code path can be tested anywhere.
    The environment variable MLSAE_AUTOCAST=bf16 has the same effect for the CLI.
    """
    if isinstance(dtype, str):
        dtype = _AUTOCAST_NAMES[dtype.lower()]
    token = _AUTOCAST.set(dtype)
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def autocast_dtype() -> torch.dtype | None:
    """The mixed-precision dtype in force: `mixed_precision(...)`, else $MLSAE_AUTOCAST."""
    dtype = _AUTOCAST.get()
    if dtype is None:
        env = os.environ.get("MLSAE_AUTOCAST", "").strip().lower()
        if env and env not in ("0", "off", "none", "fp32", "float32"):
            if env not in _AUTOCAST_NAMES:
                raise ValueError(
                    f"MLSAE_AUTOCAST={env!r} is not allowed: one of {sorted(_AUTOCAST_NAMES)}"
                )
            dtype = _AUTOCAST_NAMES[env]
    return dtype


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.autocast for `device` when mixed precision is on, else a no-op."""
    dtype = autocast_dtype()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or disagrees with its config or with the caller."""


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

    encoder.weight [n_latents, n_inputs]; decoder.weight [n_inputs, n_latents] with unit-norm
    columns, stored so that `decoder.weight.t()` is contiguous (the sparse decode gathers
    its rows); pre_encoder_bias [n_inputs].
    """

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        auxk: int | None = 256,
        dead_tokens_threshold: int = 10_000_000,
        dead_threshold: float = 1e-3,
        standardize: bool = True,
        metadata: dict[str, Any] | None = None,
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

        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        # Tokens seen since each latent last fired (counted in tokens, SPEC section 3.6).
        self.register_buffer(
            "tokens_since_fired", torch.zeros(n_latents, dtype=torch.long), persistent=False
        )
        with torch.no_grad():
            self.decoder.weight = nn.Parameter(self.encoder.weight.detach().clone().t())
            self.normalize_decoder()

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
        weight = self.encoder.weight  # [n, d]

        rows = max(1, ENCODE_CHUNK_ELEMENTS // self.n_latents)
        top_v, top_i, aux_v, aux_i = [], [], [], []
        with torch.no_grad():
            xb_ng, w_ng = xb.detach(), weight.detach()
            for s in range(0, xb.shape[0], rows):
                z = xb_ng[s : s + rows] @ w_ng.t()  # [rows, n]
                v, i = torch.topk(z, self.k, dim=-1, sorted=False)
                top_v.append(v)
                top_i.append(i)
                if n_aux:
                    av, ai = torch.topk(z[:, dead_idx], n_aux, dim=-1, sorted=False)
                    aux_v.append(av)
                    aux_i.append(dead_idx[ai])
        indices = torch.cat(top_i)
        top_values = torch.cat(top_v)
        if top_values.dtype != xb.dtype:
            # Mixed precision picked the latents; their values are recomputed at full precision.
            top_values = gathered_preacts(xb.detach(), w_ng, indices)
        values = selected_preacts(xb, weight, indices, top_values)
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=x.device)
        fired[indices[values.detach() > self.dead_threshold]] = True
        topk = TopK(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))
        auxk = None
        if n_aux:
            aux_indices = torch.cat(aux_i)
            aux_top = torch.cat(aux_v)
            if aux_top.dtype != xb.dtype:
                aux_top = gathered_preacts(xb.detach(), w_ng, aux_indices)
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

    def latents_dense(self, topk: TopK) -> torch.Tensor:
        """[..., n_latents] dense latents: for small inputs only (tests, the explorer)."""
        out = torch.zeros(*topk.values.shape[:-1], self.n_latents, dtype=topk.values.dtype)
        return out.scatter_(-1, topk.indices, topk.values)

    # ----- persistence --------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "n_inputs": self.n_inputs,
            "n_latents": self.n_latents,
            "k": self.k,
            "auxk": self.auxk,
            "dead_threshold": self.dead_threshold,
            "dead_tokens_threshold": self.dead_tokens_threshold,
            "standardize": self.standardize,
            **self.metadata,
        }

    def weights_dict(self) -> dict[str, torch.Tensor]:
        return {
            "encoder.weight": self.encoder.weight.detach().float().contiguous().cpu(),
            "decoder.weight": self.decoder.weight.detach().float().contiguous().cpu(),
            "pre_encoder_bias": self.pre_encoder_bias.detach().float().contiguous().cpu(),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors then config.json, each atomically, into `directory`.

        Other files in the directory (training history, resume state, analyses) are kept.
        The config is also embedded in the weights file's header: a checkpoint whose
        config.json disagrees with its weights (a hand edit, or a kill between the two renames)
        is refused by the loader instead of being used with the wrong settings.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config_dict()
        meta = {"format": "pt", EMBEDDED_CONFIG_KEY: json.dumps(config)}
        with atomic.atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(self.weights_dict(), str(tmp), metadata=meta)
        atomic.write_json(directory / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, device: str | torch.device = "cpu", **expect: Any
    ) -> MLSAE:
        """Load a checkpoint directory (or a hub repo id, for online users).

        Keyword arguments (e.g. n_inputs=576, k=32) are expectations: a checkpoint that
        disagrees is refused rather than silently used.
        """
        directory = resolve_checkpoint(path_or_repo_id)
        config = read_checkpoint_config(directory)
        for key, want in expect.items():
            if config.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {directory} has {key}={config.get(key)!r} but {want!r} was "
                    "expected; pick the checkpoint trained for this setting"
                )
        known = {
            "n_inputs",
            "n_latents",
            "k",
            "auxk",
            "dead_threshold",
            "dead_tokens_threshold",
            "standardize",
        }
        metadata = {k: v for k, v in config.items() if k not in known}
        sae = cls(
            n_inputs=int(config["n_inputs"]),
            n_latents=int(config["n_latents"]),
            k=int(config["k"]),
            auxk=config.get("auxk", 256),
            dead_tokens_threshold=int(config.get("dead_tokens_threshold", 10_000_000)),
            dead_threshold=float(config.get("dead_threshold", 1e-3)),
            standardize=bool(config.get("standardize", True)),
            metadata=metadata,
        )
        sae.load_weights(read_checkpoint_weights(directory))
        return sae.to(device)

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in, refusing missing/extra names or wrong shapes by name."""
        want = {
            "encoder.weight": (self.n_latents, self.n_inputs),
            "decoder.weight": (self.n_inputs, self.n_latents),
            "pre_encoder_bias": (self.n_inputs,),
        }
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise CheckpointError(
                f"checkpoint tensors do not match an MLSAE: missing {missing}, unexpected {extra}"
            )
        for name, shape in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(t.shape)} but the config "
                    f"(n_inputs={self.n_inputs}, n_latents={self.n_latents}) needs {shape}"
                )
            if not torch.isfinite(t).all():
                raise CheckpointError(f"checkpoint tensor {name} contains NaN or Inf")
        self.encoder.weight.copy_(tensors["encoder.weight"])
        self.decoder.weight.copy_(tensors["decoder.weight"])
        self.pre_encoder_bias.copy_(tensors["pre_encoder_bias"])

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the checkpoint directory to the HF Hub (online users only)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "ckpt")
            api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "ckpt"))
        return repo_id


def resolve_checkpoint(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub snapshot (downloaded for online users)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory holding it")
        return path
    looks_local = (
        str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") > 1
    )
    if looks_local:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_repo_id)))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same to the user
        raise CheckpointError(
            f"{path_or_repo_id!r} is not a local directory and could not be fetched from the "
            f"hub ({type(exc).__name__}: {exc}); pass the path of a trained checkpoint"
        ) from exc


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG_NAME
    embedded = _embedded_config(directory / WEIGHTS_NAME)
    if embedded is not None:
        if cfg_path.exists():
            try:
                on_disk = json.loads(cfg_path.read_text())
            except json.JSONDecodeError:
                on_disk = None
            if on_disk != embedded:
                keys = sorted(
                    k
                    for k in set(embedded) | set(on_disk or {})
                    if (on_disk or {}).get(k) != embedded.get(k)
                )
                raise CheckpointError(
                    f"{cfg_path} disagrees with the config saved inside {WEIGHTS_NAME} on "
                    f"{keys} (edited by hand, or a save was interrupted between the two "
                    "files); restore config.json, or save the checkpoint again"
                )
        config = embedded
    elif not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} is missing: not an MLSAE checkpoint directory")
    else:
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if "dead_tokens_threshold" not in config and "dead_steps_threshold" in config:
        # The reference counted steps; keep its number as tokens-per-step is unknown here.
        config["dead_tokens_threshold"] = config.pop("dead_steps_threshold")
    missing = [key for key in ("n_inputs", "n_latents", "k") if key not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks required keys {missing}")
    for key in ("n_inputs", "n_latents", "k"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise CheckpointError(f"{cfg_path}: {key}={config[key]!r} must be a positive integer")
    return config


def _embedded_config(weights: Path) -> dict[str, Any] | None:
    """The config saved in the safetensors header by save_pretrained, if any (None if unreadable:
    the weights loader then reports the corruption)."""
    if not weights.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - corrupt headers are reported by read_checkpoint_weights
        return None


def read_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors; a truncated or tampered file gives a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing (only safetensors checkpoints are loaded)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights} is corrupt or truncated ({exc}); re-train or re-download it"
        ) from exc


# ----- losses ------------------------------------------------------------------------------
def fvu_per_layer(x: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """[n_layers] sum||r - x||^2 / sum||x - xbar_l||^2 over the tokens of each layer.

    x, recons: [n_layers, *tokens, d].
    """
    x2 = x.reshape(x.shape[0], -1, x.shape[-1])
    r2 = recons.reshape_as(x2)
    err = (r2 - x2).pow(2).sum(dim=(1, 2))
    var = (x2 - x2.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    return err / var.clamp_min(1e-12)


def auxk_loss(inputs: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
    """||e - e_aux||^2 / ||e - mean(e)||^2, e the main error in standardized space; 0 if none dead."""
    if out.auxk_recons is None:
        return inputs.new_zeros(())
    if out.stats is not None:
        x_hat = (inputs - out.stats.mean) / (out.stats.std + STD_EPS)
        r_hat = (out.recons - out.stats.mean) / out.stats.std.clamp_min(1e-12)
    else:
        x_hat, r_hat = inputs, out.recons
    e = (x_hat - r_hat).detach().reshape(-1, inputs.shape[-1])
    e_aux = out.auxk_recons.reshape_as(e)
    denom = (e - e.mean(dim=0, keepdim=True)).pow(2).sum()
    loss = (e - e_aux).pow(2).sum() / denom.clamp_min(1e-12)
    return torch.nan_to_num(loss, nan=0.0)


def total_loss(x: torch.Tensor, out: AutoencoderOutput, auxk_coef: float):
    """(total, main FVU averaged over layers, aux) for x: [n_layers, *tokens, d]."""
    main = fvu_per_layer(x, out.recons).mean()
    aux = auxk_loss(x, out)
    return main + auxk_coef * aux, main, aux
