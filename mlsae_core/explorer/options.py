"""Command-line options of `mlsae explore` (kept free of heavy imports: `mlsae --help` and
the other commands build this parser without loading torch or FastAPI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def find_checkpoints(root: Path, max_depth: int = 6) -> list[Path]:
    """Checkpoint directories (config.json + model.safetensors) under `root`, sorted."""
    found: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return found
    for cfg in sorted(root.rglob("model.safetensors")):
        rel = cfg.relative_to(root)
        if len(rel.parts) <= max_depth + 1 and (cfg.parent / "config.json").is_file():
            try:
                meta = json.loads((cfg.parent / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and "n_latents" in meta:
                found.append(cfg.parent)
    return found


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo_id",
        default=None,
        help="checkpoint directory (e.g. one listed by --list) or hub repo id",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the trained checkpoints under $MLSAE_DATA_DIR (or --root) and exit",
    )
    p.add_argument("--root", type=Path, default=None, help="where --list looks")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--model_name", default=None, help="transformer (default: the checkpoint's model_name)"
    )
    p.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="max_examples Parquet (default: <repo_id>/max_examples.parquet, or for a pipeline "
        "checkpoint <root>/saes/<model>/<sae>: <root>/tables/max_examples/<model>__<sae>.parquet)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max_prompt_tokens", type=int, default=128, help="prompt token cap")
    p.add_argument("--max_prompt_chars", type=int, default=2000, help="prompt character cap")
    p.add_argument("--cache_entries", type=int, default=64, help="prompts kept in the LRU cache")
    p.add_argument("--cache_mb", type=int, default=512, help="LRU cache size bound in MiB")
