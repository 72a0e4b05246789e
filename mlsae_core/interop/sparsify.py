"""EleutherAI sparsify's SAEs (`<run>/layers.N/cfg.json` + `sae.safetensors`, the run's
settings in `<run>/config.json`), read as single-layer MLSAEs on block N's output. Read only:
SAELens's format is the one mlsae writes for other tools (docs/interop.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mlsae_core.checkpoint import CheckpointError, float_tensors, read_json, refuse

FORMAT, CONFIG, WEIGHTS = "sparsify", "cfg.json", "sae.safetensors"
_RESIDUAL_HOOK = re.compile(r"^(?:layers|h)\.(\d+)$")  # a block's output: the residual stream


def find(directory: Path) -> Path | None:
    """The sparsify SAE `directory` names: itself (`<run>/layers.N`) or the one SAE of a run;
    None when it holds no sparsify SAE. A run with several must be narrowed to one."""
    if (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file():
        return directory
    found = sorted(p.parent for p in directory.glob(f"*/{WEIGHTS}"))
    found = [p for p in found if (p / CONFIG).is_file()]
    if len(found) > 1:
        raise CheckpointError(
            f"{directory} holds {len(found)} sparsify SAEs ({', '.join(p.name for p in found)}); "
            f"pass one of them, e.g. --repo_id {found[0]}"
        )
    return found[0] if found else None


def read(sae_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An MLSAE config and tensors from a sparsify SAE: a single-layer SAE on block N's output
    with sparsify's encoder bias, no standardization; what it cannot be is refused by name."""
    cfg = read_json(sae_dir / CONFIG)
    hook = _RESIDUAL_HOOK.match(sae_dir.name)
    refuse(f"{sae_dir} is a sparsify SAE that mlsae cannot evaluate", "evaluates", (
        (cfg.get("transcode"), "it is a transcoder (it predicts a module's output)"),
        (cfg.get("skip_connection"), "it has a skip connection (W_skip)"),
        (cfg.get("activation", "topk") != "topk", f"its activation is {cfg.get('activation')!r}"),
        (hook is None, f"its hook point {sae_dir.name!r} is not a block output (layers.N, h.N)"),
    ))  # fmt: skip
    raw = float_tensors(sae_dir / WEIGHTS)
    n_latents, n_inputs = raw["encoder.weight"].shape
    run_path = sae_dir.parent / "config.json"
    run = read_json(run_path) if run_path.is_file() else {}
    recorded = {"model": "model_name", "dataset": "dataset", "ctx_len": "max_length",
                "text_column": "text_field"}  # fmt: skip
    config = {
        "n_inputs": n_inputs, "n_latents": n_latents, "k": int(cfg["k"]), "standardize": False,
        "encoder_bias": True, "layers": [int(hook[1])], "source_format": FORMAT,
        **{ours: run[theirs] for theirs, ours in recorded.items() if run.get(theirs)},
    }  # fmt: skip
    tensors = {"encoder.weight": raw["encoder.weight"], "encoder.bias": raw["encoder.bias"],
               "decoder.weight": raw["W_dec"].t(), "pre_encoder_bias": raw["b_dec"]}  # fmt: skip
    return config, tensors
