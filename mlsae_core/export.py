"""MLSAEs out of the tool: one SAELens TopK SAE per layer (docs/interop.md).

An MLSAE is one dictionary for many layers, so layer l exports as a SAELens SAE that shares its
weights and reads block l's output (`hook_name`, a module of the HF model, which SAELens wraps
with `HookedProxyLM`). Our per-vector standardization is SAELens's
`normalize_activations="layer_norm"` (mean over d, Bessel-corrected std, +1e-5 on the std, and
the reconstruction scaled back): tests/test_interop.py checks the two encode and decode alike.
The format is written here (SAELens is not a dependency of the product).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlsae_core import atomic
from mlsae_core.layout import RunLayout
from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

SAELENS_TESTED = "6.54.12"  # the SAELens version tests/test_interop.py loads the export with
FORMATS = ("saelens", "dashboard")


def saelens_version() -> str:
    """The installed SAELens's version (the format it reads), else the one we tested."""
    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return SAELENS_TESTED


def export_saelens(
    repo_id: str | Path, out_dir: Path, models_dir: Path | None = None
) -> list[Path]:
    """Write `out_dir/<hook_name>/` (cfg.json, sae_weights.safetensors and, when the run has
    its layer distributions, sparsity.safetensors) for every layer the MLSAE was trained on.
    The hook names come from the model's config (`transformer.blocks_path`; a model key
    resolves under `models_dir`, default the storage root's models/)."""
    from mlsae_core.analysis.tables import dists_from_layer_table
    from mlsae_core.checkpoint import resolve_checkpoint
    from mlsae_core.transformer import blocks_path

    sae = MLSAE.from_pretrained(repo_id)
    meta = sae.metadata
    if not meta.get("model_name") or not meta.get("layers"):
        raise ValueError(f"{repo_id}: config.json does not record model_name and layers")
    blocks = blocks_path(meta["model_name"], models_dir)
    table = RunLayout(resolve_checkpoint(repo_id)).table("latent_layer_dists")
    dists = dists_from_layer_table(atomic.read_parquet(table)) if table.exists() else None
    if dists is None:
        logger.warning("%s has no layer distributions: no sparsity.safetensors (run `mlsae "
                       "dists --repo_id %s` first to include them)", repo_id, repo_id)  # fmt: skip
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
                "sae_lens_version": saelens_version(), "model_name": meta["model_name"],
                "model_class_name": "AutoModelForCausalLM", "hook_name": hook,
                "hook_head_index": None, "context_size": meta.get("max_length"),
                "dataset_path": meta.get("dataset"), "mlsae_checkpoint": str(repo_id),
                "mlsae_layers": meta["layers"],
            },
        }  # fmt: skip
        directory = out_dir / hook
        directory.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(directory / "sae_weights.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic.write_json(directory / "cfg.json", cfg)
        names = ["sae_weights.safetensors", "cfg.json"]
        if dists is not None:  # SAELens's log10 firing frequency, as its trainer saves it
            density = dists.counts[dists.layers.index(layer)] / max(1, dists.n_tokens)
            sparsity = {"sparsity": torch.log10(density + 1e-10).float()}
            with atomic.atomic_path(directory / "sparsity.safetensors") as tmp:
                save_file(sparsity, str(tmp))
            names.append("sparsity.safetensors")
        atomic.record(directory, names)
        written.append(directory)
    return written
