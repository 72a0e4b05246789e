"""The MLSAE checkpoint format: a directory holding model.safetensors and config.json.

The config is also embedded in the weights' header, so a config.json that disagrees with its
weights (a hand edit, an interrupted save) is refused. Both files are recorded in the manifest
and verified before they are parsed; a mismatch is refused naming the file, never repaired. A
directory without a manifest is a foreign format, loaded as it is. The other tools' formats
are read and written in `mlsae_core.interop` (docs/interop.md), on the helpers below.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlsae_core import atomic

if TYPE_CHECKING:  # the model builds itself from `interop.read_sae` (MLSAE.from_pretrained)
    from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
EMBEDDED_CONFIG_KEY = "mlsae_config"
CONFIG_NAME = "config.json"
REQUIRED = ("n_inputs", "n_latents", "k")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or disagrees with its config or with the caller."""


def save_sae(sae: MLSAE, directory: str | Path) -> Path:
    """Write model.safetensors then config.json, each atomically, recorded in the manifest;
    other files in `directory` are kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = sae.config_dict()
    meta = {"format": "pt", EMBEDDED_CONFIG_KEY: json.dumps(config)}
    with atomic.atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(sae.weights_dict(), str(tmp), metadata=meta)
    atomic.write_json(directory / CONFIG_NAME, config)
    atomic.record(directory, [WEIGHTS_NAME, CONFIG_NAME])
    return directory


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def float_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a foreign weights file, as float32."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n).float() for n in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from exc


def refuse(what: str, verb: str, reasons: tuple[tuple[Any, str], ...]) -> None:
    """One line naming every reason whose condition holds: what a foreign SAE has that mlsae
    cannot represent."""
    why = [text for condition, text in reasons if condition]
    if why:
        raise CheckpointError(
            f"{what}: {'; '.join(why)}; mlsae {verb} TopK SAEs on the residual stream"
        )


def verify_files(directory: Path, names: list[str]) -> None:
    """Refuse, naming the file, files that do not match the directory's manifest; a directory
    without a manifest is a foreign format, loaded as it is."""
    if not (directory / atomic.MANIFEST_NAME).is_file():
        logger.debug("%s has no %s: a foreign checkpoint, loaded as it is", directory,
                     atomic.MANIFEST_NAME)  # fmt: skip
        return
    try:
        atomic.verify(directory, names)
    except atomic.CorruptFileError as exc:
        raise CheckpointError(str(exc)) from exc


@torch.no_grad()
def load_weights(sae: MLSAE, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into `sae`, refusing missing/extra names or wrong shapes by name."""
    want = {name: tuple(p.shape) for name, p in sae.named_parameters()}
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
                f"(n_inputs={sae.n_inputs}, n_latents={sae.n_latents}) needs {shape}"
            )
        if not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint tensor {name} contains NaN or Inf")
    for name in want:
        sae.get_parameter(name).copy_(tensors[name])


def push_to_hub(sae: MLSAE, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the checkpoint directory to the HF Hub (online users only)."""
    from huggingface_hub import HfApi  # optional: only hub users pay for the import

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, Path(tmp) / "ckpt")  # with its manifest
        api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "ckpt"))
    return repo_id


def resolve_checkpoint(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub snapshot (downloaded for online users)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory holding it")
        return path
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") > 1:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download  # optional, as in push_to_hub

        return Path(snapshot_download(str(path_or_repo_id)))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same to the user
        raise CheckpointError(
            f"{path_or_repo_id!r} is not a local directory and could not be fetched from the "
            f"hub ({type(exc).__name__}: {exc}); pass the path of a trained checkpoint"
        ) from exc


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config, checked against the copy embedded in its weights (and both
    files against the directory's manifest first)."""
    verify_files(directory, [WEIGHTS_NAME, CONFIG_NAME])
    cfg_path = directory / CONFIG_NAME
    embedded = _embedded_config(directory / WEIGHTS_NAME)
    if embedded is None:
        if not cfg_path.exists():
            raise CheckpointError(f"{cfg_path} is missing: not an MLSAE checkpoint directory")
        return checked_config(read_json(cfg_path), cfg_path)
    if cfg_path.exists():
        try:
            on_disk = json.loads(cfg_path.read_text()) or {}
        except json.JSONDecodeError:
            on_disk = {}
        if on_disk != embedded:
            keys = sorted(k for k in {*embedded, *on_disk} if on_disk.get(k) != embedded.get(k))
            raise CheckpointError(
                f"{cfg_path} disagrees with the config saved inside {WEIGHTS_NAME} on "
                f"{keys} (edited by hand, or a save was interrupted between the two "
                "files); restore config.json, or save the checkpoint again"
            )
    return checked_config(embedded, cfg_path)


def checked_config(config: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """`config` with the reference's step count read as tokens, its required keys checked."""
    if "dead_tokens_threshold" not in config and "dead_steps_threshold" in config:
        # The reference counted steps; keep its number as tokens-per-step is unknown here.
        config["dead_tokens_threshold"] = config.pop("dead_steps_threshold")
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks required keys {missing}")
    for key in REQUIRED:
        if not isinstance(config[key], int) or config[key] < 1:
            raise CheckpointError(f"{cfg_path}: {key}={config[key]!r} must be a positive integer")
    return config


def _embedded_config(weights: Path) -> dict[str, Any] | None:
    """The config save_sae put in the safetensors header, or None (also if unreadable)."""
    if not weights.exists():
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - corrupt headers are reported by read_tensors
        return None


def tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a weights file's header ({} if absent or unreadable)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception:  # noqa: BLE001 - reported by the loader that needs the tensors
        return {}


def has_prefix(directory: Path, prefix: str) -> bool:
    return any(n.startswith(prefix) for n in tensor_shapes(directory / WEIGHTS_NAME))


def read_tensors(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors under `prefix` (default: all), the prefix stripped;
    an unreadable file gives a one-line error naming it."""
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing (only safetensors checkpoints are loaded)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {n[len(prefix) :]: f.get_tensor(n) for n in f.keys() if n.startswith(prefix)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights} is corrupt or truncated ({exc}); re-train or re-download it"
        ) from exc
