"""The MLSAE checkpoint format: a directory holding model.safetensors and config.json.

The config is also embedded in the weights' header, so a config.json that disagrees with its
weights (a hand edit, an interrupted save) is refused. Both files are recorded in the manifest
and verified before they are parsed; a mismatch is refused naming the file, never repaired. A
directory without a manifest is a foreign format (the reference's layout, a hub repo by other
tools), loaded as it is. The reference's `...-tfm` repos hold `autoencoder.*` and
`transformer.model.*` in one file, with the training module's settings as config.json.
EleutherAI sparsify's checkpoints (`<run>/layers.N/cfg.json` + `sae.safetensors`, the run's
settings in `<run>/config.json`) and SAELens TopK SAEs (`cfg.json` + `sae_weights.safetensors`)
load as single-layer SAEs on their layer, or as the MLSAE an export came from (docs/interop.md).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlsae_core import atomic

if TYPE_CHECKING:  # the model builds itself from `read_sae` (MLSAE.from_pretrained)
    from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
EMBEDDED_CONFIG_KEY = "mlsae_config"
CONFIG_NAME = "config.json"

_REQUIRED = ("n_inputs", "n_latents", "k")
# Optional settings and how each is read; absent ones take MLSAE's (= SAEConfig's) defaults.
_OPTIONAL: dict[str, Callable[[Any], Any]] = {
    "auxk": lambda value: value,
    "dead_threshold": float,
    "dead_tokens_threshold": int,
    "standardize": bool,
    "encoder_bias": bool,
}

# The reference's training-module checkpoints (`...-tfm` repos): prefixes in one weights file.
TFM_AUTOENCODER = "autoencoder."
TFM_TRANSFORMER = "transformer.model."
TFM_LENS = "lens."
TFM_FORMAT = "tfm"  # metadata["source_format"]: settings mapped from the training module's
SPARSIFY_FORMAT, SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "sparsify", "cfg.json", "sae.safetensors"
_RESIDUAL_HOOK = re.compile(r"^(?:layers|h)\.(\d+)$")  # a block's output: the residual stream
SAELENS_FORMAT, SAELENS_WEIGHTS = "saelens", "sae_weights.safetensors"
_SAELENS_HOOK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")  # e.g. model.layers.3
_LAYER_INDEX = re.compile(r"^transformer\.model\..*?\.(?:layers|h)\.(\d+)\.")


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


def read_sae(
    path_or_repo_id: str | Path, **expect: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint directory's (or hub repo id's) MLSAE constructor arguments and tensors;
    keyword arguments (e.g. n_inputs=576, k=32) are expectations, refused when not met."""
    directory = resolve_checkpoint(path_or_repo_id)
    config, tensors = None, None
    if (directory / SPARSIFY_CONFIG).is_file() and (directory / SAELENS_WEIGHTS).is_file():
        config, tensors = _read_saelens(directory)
    elif sparsify := sparsify_dir(directory):
        config, tensors = _read_sparsify(sparsify)
    config = config or read_checkpoint_config(directory)
    for key, want in expect.items():
        if config.get(key) != want:
            raise CheckpointError(
                f"checkpoint {directory} has {key}={config.get(key)!r} but {want!r} was "
                "expected; pick the checkpoint trained for this setting"
            )
    known = {*_REQUIRED, *_OPTIONAL}
    kwargs = dict(
        n_inputs=int(config["n_inputs"]),
        n_latents=int(config["n_latents"]),
        k=int(config["k"]),
        metadata={k: v for k, v in config.items() if k not in known},
        **{key: read(config[key]) for key, read in _OPTIONAL.items() if key in config},
    )
    if tensors is not None:
        return kwargs, tensors
    # the file's layout, not its (copied) metadata, says whether it is a training module's
    prefix = TFM_AUTOENCODER if _has_prefix(directory, TFM_AUTOENCODER) else ""
    return kwargs, read_tensors(directory, prefix)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _float_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n).float() for n in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from exc


def _refuse(what: str, verb: str, reasons: tuple[tuple[Any, str], ...]) -> None:
    """One line naming every reason whose condition holds: what a foreign SAE has that mlsae
    cannot represent."""
    why = [text for condition, text in reasons if condition]
    if why:
        raise CheckpointError(
            f"{what}: {'; '.join(why)}; mlsae {verb} TopK SAEs on the residual stream"
        )


def _read_saelens(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An MLSAE from a SAELens TopK SAE: `layer_norm` input normalization is our
    standardization; an SAE exported from an MLSAE comes back on all of the MLSAE's layers."""
    if (directory / atomic.MANIFEST_NAME).is_file():  # written by `mlsae export`
        try:
            atomic.verify(directory, [SPARSIFY_CONFIG, SAELENS_WEIGHTS])
        except atomic.CorruptFileError as exc:
            raise CheckpointError(str(exc)) from exc
    cfg = _json(directory / SPARSIFY_CONFIG)
    meta = cfg.get("metadata") or {}
    hook = _SAELENS_HOOK.search(str(meta.get("hook_name") or ""))
    norm = cfg.get("normalize_activations", "none")
    _refuse(f"{directory} is a SAELens SAE that mlsae cannot load", "loads", (
        (cfg.get("architecture") != "topk", f"its architecture is {cfg.get('architecture')!r}"),
        (norm not in ("none", "layer_norm"), f"its normalize_activations is {norm!r}"),
        (cfg.get("rescale_acts_by_decoder_norm"), "it rescales activations by decoder norm"),
        (cfg.get("reshape_activations", "none") != "none", "it reads attention heads (hook_z)"),
        (hook is None, f"its hook {meta.get('hook_name')!r} is not a block output (...layers.N)"),
    ))  # fmt: skip
    t = _float_tensors(directory / SAELENS_WEIGHTS)
    # apply_b_dec_to_input false: W(x) + b_enc = W(x - b_dec) + (b_enc + W b_dec)
    shift = 0 if cfg.get("apply_b_dec_to_input", True) else t["b_dec"] @ t["W_enc"]
    config = {
        "n_inputs": int(cfg["d_in"]), "n_latents": int(cfg["d_sae"]), "k": int(cfg["k"]),
        "standardize": norm == "layer_norm", "encoder_bias": bool((t["b_enc"] + shift).any()),
        "layers": meta.get("mlsae_layers") or [int(hook[1])], "source_format": SAELENS_FORMAT,
        **{ours: meta[theirs] for theirs, ours in (("model_name", "model_name"),
           ("dataset_path", "dataset"), ("context_size", "max_length")) if meta.get(theirs)},
    }  # fmt: skip
    tensors = {"encoder.weight": t["W_enc"].t(), "decoder.weight": t["W_dec"].t(),
               "pre_encoder_bias": t["b_dec"]}  # fmt: skip
    if config["encoder_bias"]:
        tensors["encoder.bias"] = t["b_enc"] + shift
    return config, tensors


def sparsify_dir(directory: Path) -> Path | None:
    """The sparsify SAE `directory` names: itself (`<run>/layers.N`) or the one SAE of a run;
    None when it holds no sparsify SAE. A run with several must be narrowed to one."""
    if (directory / SPARSIFY_CONFIG).is_file() and (directory / SPARSIFY_WEIGHTS).is_file():
        return directory
    found = sorted(p.parent for p in directory.glob(f"*/{SPARSIFY_WEIGHTS}"))
    found = [p for p in found if (p / SPARSIFY_CONFIG).is_file()]
    if len(found) > 1:
        raise CheckpointError(
            f"{directory} holds {len(found)} sparsify SAEs ({', '.join(p.name for p in found)}); "
            f"pass one of them, e.g. --repo_id {found[0]}"
        )
    return found[0] if found else None


def _read_sparsify(sae_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An MLSAE config and tensors from a sparsify SAE: a single-layer SAE on block N's output
    with sparsify's encoder bias, no standardization; what it cannot be is refused by name."""
    cfg = _json(sae_dir / SPARSIFY_CONFIG)
    hook = _RESIDUAL_HOOK.match(sae_dir.name)
    _refuse(f"{sae_dir} is a sparsify SAE that mlsae cannot evaluate", "evaluates", (
        (cfg.get("transcode"), "it is a transcoder (it predicts a module's output)"),
        (cfg.get("skip_connection"), "it has a skip connection (W_skip)"),
        (cfg.get("activation", "topk") != "topk", f"its activation is {cfg.get('activation')!r}"),
        (hook is None, f"its hook point {sae_dir.name!r} is not a block output (layers.N, h.N)"),
    ))  # fmt: skip
    raw = _float_tensors(sae_dir / SPARSIFY_WEIGHTS)
    n_latents, n_inputs = raw["encoder.weight"].shape
    run_path = sae_dir.parent / "config.json"
    run = _json(run_path) if run_path.is_file() else {}
    recorded = {"model": "model_name", "dataset": "dataset", "ctx_len": "max_length",
                "text_column": "text_field"}  # fmt: skip
    config = {
        "n_inputs": n_inputs, "n_latents": n_latents, "k": int(cfg["k"]), "standardize": False,
        "encoder_bias": True, "layers": [int(hook[1])], "source_format": SPARSIFY_FORMAT,
        **{ours: run[theirs] for theirs, ours in recorded.items() if run.get(theirs)},
    }  # fmt: skip
    tensors = {"encoder.weight": raw["encoder.weight"], "encoder.bias": raw["encoder.bias"],
               "decoder.weight": raw["W_dec"].t(), "pre_encoder_bias": raw["b_dec"]}  # fmt: skip
    return config, tensors


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


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config, checked against the copy embedded in its weights (and both
    files against the directory's manifest first, `verify_checkpoint`)."""
    verify_checkpoint(directory)
    cfg_path = directory / CONFIG_NAME
    embedded = _embedded_config(directory / WEIGHTS_NAME)
    if embedded is not None:
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
        config = embedded
    elif not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} is missing: not an MLSAE checkpoint directory")
    elif _has_prefix(directory, TFM_AUTOENCODER):
        config = _tfm_config(directory)
    else:
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if "dead_tokens_threshold" not in config and "dead_steps_threshold" in config:
        # The reference counted steps; keep its number as tokens-per-step is unknown here.
        config["dead_tokens_threshold"] = config.pop("dead_steps_threshold")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks required keys {missing}")
    for key in _REQUIRED:
        if not isinstance(config[key], int) or config[key] < 1:
            raise CheckpointError(f"{cfg_path}: {key}={config[key]!r} must be a positive integer")
    return config


def verify_checkpoint(directory: Path) -> None:
    """Refuse, naming the file, a checkpoint whose files do not match its manifest; one without
    a manifest is a foreign format, loaded as it is."""
    if not (directory / atomic.MANIFEST_NAME).is_file():
        logger.debug("%s has no %s: a foreign checkpoint, loaded as it is", directory,
                     atomic.MANIFEST_NAME)  # fmt: skip
        return
    try:
        atomic.verify(directory, [WEIGHTS_NAME, CONFIG_NAME])
    except atomic.CorruptFileError as exc:
        raise CheckpointError(str(exc)) from exc


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


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a weights file's header ({} if absent or unreadable)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception:  # noqa: BLE001 - reported by the loader that needs the tensors
        return {}


def _has_prefix(directory: Path, prefix: str) -> bool:
    return any(n.startswith(prefix) for n in _tensor_shapes(directory / WEIGHTS_NAME))


def _tfm_config(directory: Path) -> dict[str, Any]:
    """An MLSAE config from a reference training-module checkpoint: its settings as metadata,
    shapes from the `autoencoder.*` tensors, `tuned_lens` when it holds `lens.*`."""
    cfg_path = directory / CONFIG_NAME
    weights = directory / WEIGHTS_NAME
    try:
        settings = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(settings, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object of settings")
    shapes = _tensor_shapes(weights)  # readable: `_has_prefix` found autoencoder.*
    names = list(shapes)
    enc = shapes.get(TFM_AUTOENCODER + "encoder.weight")
    dec = shapes.get(TFM_AUTOENCODER + "decoder.weight")
    if enc is None or dec is None or len(enc) != 2 or len(dec) != 2:
        raise CheckpointError(
            f"{weights} has autoencoder.* tensors but no 2-d autoencoder.encoder.weight and "
            "autoencoder.decoder.weight; not a reference training-module checkpoint"
        )
    config = {**settings, "n_latents": int(enc[0]), "n_inputs": int(dec[0])}
    config["source_format"] = TFM_FORMAT
    config["tuned_lens"] = bool(settings.get("tuned_lens")) or any(
        n.startswith(TFM_LENS) for n in names
    )
    factor = settings.get("expansion_factor")
    if isinstance(factor, int) and factor * config["n_inputs"] != config["n_latents"]:
        raise CheckpointError(
            f"{cfg_path}: expansion_factor={factor} but the autoencoder has "
            f"{config['n_latents']} latents for {config['n_inputs']} inputs"
        )
    if not settings.get("layers") and "n_model_layers" not in settings:
        # layers=None means every layer; count them from the transformer's tensor names.
        found = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
        if found and any(n.startswith(TFM_TRANSFORMER) for n in names):
            config["n_model_layers"] = max(found) + 1
    return config


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


def tfm_lens(directory: Path) -> Any:
    """The tuned lens saved in a training-module checkpoint (`lens.layer_translators.<i>.*`,
    translator i applied to block i's output, as the original code did), or None."""
    if not _has_prefix(directory, TFM_LENS):
        return None
    from mlsae_core.lens import TunedLens

    state = read_tensors(directory, TFM_LENS)
    return TunedLens.from_state_dict(
        state, prefix="layer_translators.", index_offset=0, where=directory / WEIGHTS_NAME
    )


def tfm_transformer_state(directory: Path) -> dict[str, torch.Tensor] | None:
    """The transformer's state dict saved in a training-module checkpoint (None if none)."""
    if not _has_prefix(directory, TFM_TRANSFORMER):
        return None
    return read_tensors(directory, TFM_TRANSFORMER)
