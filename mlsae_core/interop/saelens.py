"""SAELens TopK SAEs (`cfg.json` + `sae_weights.safetensors`), read and written.

Out: an MLSAE is one dictionary for many layers, so layer l exports as a SAELens SAE that
shares its weights and reads block l's output (`hook_name`, a module of the HF model, which
SAELens wraps with `HookedProxyLM`). Our per-vector standardization is SAELens's
`normalize_activations="layer_norm"` (mean over d, Bessel-corrected std, +1e-5 on the std,
the reconstruction scaled back). The metadata carries what SAELens's own workflow reads
(`load_model`, `ActivationsStore.from_sae`, `run_evals`): the model's local directory, the
corpus as a dataset directory `load_dataset` opens, and `prepend_bos: false` (our chunks carry
no BOS). In: a SAELens TopK SAE loads as a single-layer SAE on its layer, or as the MLSAE an
export came from. SAELens is not a dependency of the product; tests/test_interop.py runs it.
"""

from __future__ import annotations

import logging
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from safetensors.torch import save_file

from mlsae_core import atomic
from mlsae_core.checkpoint import float_tensors, read_json, refuse, resolve_checkpoint, verify_files
from mlsae_core.layout import RunLayout, StorageLayout

if TYPE_CHECKING:  # the caller loads it (MLSAE.from_pretrained reads this format too)
    from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

FORMAT, CONFIG, WEIGHTS = "saelens", "cfg.json", "sae_weights.safetensors"
TESTED = "6.54.12"  # the SAELens version tests/test_interop.py loads the export with
_HOOK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")  # e.g. model.layers.3
DATASET_DIR = "dataset"  # the export's copy of the training corpus, for SAELens


def holds(directory: Path) -> bool:
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An MLSAE from a SAELens TopK SAE: `layer_norm` input normalization is our
    standardization; an SAE exported from an MLSAE comes back on all of the MLSAE's layers,
    with the model and dataset names it recorded."""
    verify_files(directory, [CONFIG, WEIGHTS])  # a manifest: written by `mlsae export`
    cfg = read_json(directory / CONFIG)
    meta = cfg.get("metadata") or {}
    hook = _HOOK.search(str(meta.get("hook_name") or ""))
    norm = cfg.get("normalize_activations", "none")
    refuse(f"{directory} is a SAELens SAE that mlsae cannot load", "loads", (
        (cfg.get("architecture") != "topk", f"its architecture is {cfg.get('architecture')!r}"),
        (norm not in ("none", "layer_norm"), f"its normalize_activations is {norm!r}"),
        (cfg.get("rescale_acts_by_decoder_norm"), "it rescales activations by decoder norm"),
        (cfg.get("reshape_activations", "none") != "none", "it reads attention heads (hook_z)"),
        (hook is None, f"its hook {meta.get('hook_name')!r} is not a block output (...layers.N)"),
    ))  # fmt: skip
    t = float_tensors(directory / WEIGHTS)
    # apply_b_dec_to_input false: W(x) + b_enc = W(x - b_dec) + (b_enc + W b_dec)
    shift = 0 if cfg.get("apply_b_dec_to_input", True) else t["b_dec"] @ t["W_enc"]
    recorded = {"model_name": meta.get("mlsae_model_name") or meta.get("model_name"),
                "dataset": meta.get("mlsae_dataset") or meta.get("dataset_path"),
                "max_length": meta.get("context_size")}  # fmt: skip
    config = {
        "n_inputs": int(cfg["d_in"]), "n_latents": int(cfg["d_sae"]), "k": int(cfg["k"]),
        "standardize": norm == "layer_norm", "encoder_bias": bool((t["b_enc"] + shift).any()),
        "layers": meta.get("mlsae_layers") or [int(hook[1])], "source_format": FORMAT,
        **{key: value for key, value in recorded.items() if value},
    }  # fmt: skip
    tensors = {"encoder.weight": t["W_enc"].t(), "decoder.weight": t["W_dec"].t(),
               "pre_encoder_bias": t["b_dec"]}  # fmt: skip
    if config["encoder_bias"]:
        tensors["encoder.bias"] = t["b_enc"] + shift
    return config, tensors


def saelens_version() -> str:
    """The installed SAELens's version (the format it reads), else the one we tested."""
    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return TESTED


def write(
    sae: MLSAE, source: str | Path, out_dir: Path, layout: StorageLayout | None = None
) -> list[Path]:
    """Write `out_dir/<hook_name>/` (cfg.json, sae_weights.safetensors and, when the run has
    its layer distributions, sparsity.safetensors) for every layer of `sae`, the MLSAE loaded
    from checkpoint `source`; a local corpus goes to `out_dir/dataset/`. Model and source
    names resolve under `layout` (default: the storage root's)."""
    from mlsae_core.analysis.tables import dists_from_layer_table
    from mlsae_core.transformer import SMOLLM2, blocks_path, resolve_model_path

    meta = sae.metadata
    if not meta.get("model_name") or not meta.get("layers"):
        raise ValueError(f"{source}: config.json does not record model_name and layers")
    layout = layout or StorageLayout.from_env()
    model = resolve_model_path(meta["model_name"], layout.models_dir)
    blocks = blocks_path(model)
    table = RunLayout(resolve_checkpoint(source)).table("latent_layer_dists")
    dists = dists_from_layer_table(atomic.read_parquet(table)) if table.exists() else None
    if dists is None:
        logger.warning("%s has no layer distributions: no sparsity.safetensors (run `mlsae "
                       "dists --repo_id %s` first to include them)", source, source)  # fmt: skip
    model_meta = {"model_name": str(Path(model).resolve()) if Path(model).is_dir() else model}
    if meta["model_name"].lower() == SMOLLM2 or meta["model_name"].lower().endswith(".gguf"):
        model_meta["model_note"] = (
            f"{meta['model_name']} is dequantised from a GGUF file: the hub model of that name "
            "has different weights, so load model_name (the converted directory)"
        )
    dataset = _write_dataset(meta, out_dir / DATASET_DIR, layout)
    weights = sae.weights_dict()
    tensors = {
        "W_enc": weights["encoder.weight"].t().contiguous(),
        "b_enc": weights.get("encoder.bias", torch.zeros(sae.n_latents)),
        "W_dec": weights["decoder.weight"].t().contiguous(),
        "b_dec": weights["pre_encoder_bias"],
    }
    written = []
    for layer in meta["layers"]:
        hook = f"{blocks}.{layer}"
        cfg = {
            "architecture": "topk", "d_in": sae.n_inputs, "d_sae": sae.n_latents, "k": sae.k,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if sae.standardize else "none",
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
            "metadata": {
                "sae_lens_version": saelens_version(), **model_meta,
                "model_class_name": "AutoModelForCausalLM", "hook_name": hook,
                "hook_head_index": None, "context_size": meta.get("max_length"),
                "prepend_bos": False, "dataset_path": dataset,
                "mlsae_model_name": meta["model_name"], "mlsae_dataset": meta.get("dataset"),
                "mlsae_checkpoint": str(source), "mlsae_layers": meta["layers"],
            },
        }  # fmt: skip
        directory = out_dir / hook
        directory.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(directory / WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        atomic.write_json(directory / CONFIG, cfg)
        names = [WEIGHTS, CONFIG]
        if dists is not None:  # SAELens's log10 firing frequency, as its trainer saves it
            density = dists.counts[dists.layers.index(layer)] / max(1, dists.n_tokens)
            sparsity = {"sparsity": torch.log10(density + 1e-10).float()}
            with atomic.atomic_path(directory / "sparsity.safetensors") as tmp:
                save_file(sparsity, str(tmp))
            names.append("sparsity.safetensors")
        atomic.record(directory, names)
        written.append(directory)
    return written


def _write_dataset(meta: dict[str, Any], directory: Path, layout: StorageLayout) -> str | None:
    """What SAELens's `load_dataset(dataset_path)` opens: a hub id as it is; a local corpus
    (Brown, a file or directory, a source under the storage root) as `directory`, holding
    documents.parquet: one `text` row per document, in the corpus's order."""
    from mlsae_core.brown import brown_documents
    from mlsae_core.documents import local_documents

    name = meta.get("dataset")
    if not name:
        return None
    local = Path(name).expanduser()
    if not local.exists() and "/" not in name:
        local = layout.sources_dir / name
    if name == "brown":
        docs = brown_documents()
    elif local.exists():
        docs = local_documents(local, meta.get("text_field", "text"))
    else:
        return name
    atomic.write_parquet(
        directory / "documents.parquet", pa.table({"text": [d.text for d in docs]})
    )
    return str(directory.resolve())
