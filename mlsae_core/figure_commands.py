"""`mlsae figures NAME`: the original's figure scripts, over checkpoints analysed beforehand.

Multi-checkpoint figures read the tables `mlsae analyse`/`mlsae dists` wrote beside each
checkpoint (running the missing analysis when a table is absent), so a figure never costs a
second pass over the model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_dists(checkpoint: str | Path) -> Any:
    """The DistsResult saved in latent_layer_dists.parquet (computed if missing or too old)."""
    import pyarrow.parquet as pq

    from mlsae_core.analyse import FILES, analyse_checkpoint
    from mlsae_core.analysis.tables import DISTS_META_KEY, dists_from_layer_table

    checkpoint = Path(checkpoint)
    long_path = checkpoint / FILES["layer_dists"]
    if long_path.exists():
        table = pq.read_table(long_path)
        if DISTS_META_KEY in (table.schema.metadata or {}):
            return dists_from_layer_table(table)
        logger.info("%s predates the dists metadata: recomputing", long_path)
    else:
        logger.info("%s has no layer distributions yet: computing them", checkpoint)
    return analyse_checkpoint(checkpoint, analyses=("dists",), figures=False).dists


def _need_repos(args: argparse.Namespace) -> list[Path]:
    if not args.repo_id:
        raise ValueError(f"figures {args.name} needs --repo_id with one or more checkpoints")
    return [Path(r) for r in args.repo_id]


def _label(sae_or_dir: Any) -> tuple[dict[str, Any], str]:
    from mlsae_core.runs import partition_values
    from mlsae_core.sae import MLSAE

    sae = sae_or_dir if not isinstance(sae_or_dir, Path) else MLSAE.from_pretrained(sae_or_dir)
    part = partition_values(sae)
    slug = f"{part['model']}-x{part['expansion_factor']}-k{part['k']}-L{part['layers']}"
    return part, slug.replace(",", "_")


def run_figure(args: argparse.Namespace) -> list[Path]:
    """Dispatch on args.name; returns every file written."""
    from mlsae_core import atomic, figures
    from mlsae_core.analysis import geometry, tables

    out: Path = args.out
    written: list[Path] = []
    if args.name == "resid_cos_sim":
        from mlsae_core.config import DataConfig
        from mlsae_core.runs import corpus_split, model_slug
        from mlsae_core.transformer import Transformer

        transformer = Transformer.load(args.model_name)
        data = DataConfig(dataset=args.dataset, max_length=args.max_length)
        chunks = corpus_split(transformer, data, 0, "test", args.max_tokens)
        source = geometry.transformer_batches(transformer, chunks.tokens, chunks.mask())
        result = geometry.resid_cos_sim(source)
        slug = model_slug(args.model_name)
        path = out / f"resid_cos_sim_{slug}.parquet"
        atomic.write_parquet(path, tables.resid_cos_sim_table(result, {"model": slug}))
        written.append(path)
        written += figures.resid_cos_sim_figure(result, out / f"resid_cos_sim_{slug}", title=slug)
        return written

    repos = _need_repos(args)
    if args.name == "dists_heatmaps":
        for repo in repos:
            _, slug = _label(repo)
            written += figures.dists_heatmap(load_dists(repo), out / f"dists_heatmap_{slug}", slug)
    elif args.name == "dists_layer_std":
        rows = []
        for repo in repos:
            part, _ = _label(repo)
            rows.append(
                tables.dists_layer_std_row(
                    part["model"], part["expansion_factor"], part["k"], load_dists(repo)
                )
            )
        path = out / "dists_layer_std.csv"
        tables.write_dists_layer_std_csv(path, rows)
        written.append(path)
    elif args.name == "mmcs":
        from mlsae_core.sae import MLSAE

        rows = []
        for repo in repos:
            sae = MLSAE.from_pretrained(repo)
            part, _ = _label(sae)
            summary = geometry.mmcs(sae.decoder.weight.detach())
            rows.append(
                tables.mmcs_row(part["model"], part["expansion_factor"], part["k"], summary)
            )
        path = out / "mmcs.csv"
        tables.write_mmcs_csv(path, rows)
        written.append(path)
    elif args.name == "prompt_heatmaps":
        from mlsae_core.analysis.prompts import prompt_heatmap
        from mlsae_core.runs import resolve_layers
        from mlsae_core.sae import MLSAE
        from mlsae_core.transformer import Transformer

        loaded: dict[str, Any] = {}
        for repo in repos:
            sae = MLSAE.from_pretrained(repo)
            name = sae.metadata["model_name"]
            transformer = loaded.setdefault(name, Transformer.load(name))
            layers = resolve_layers(sae.metadata.get("layers"), transformer.n_layers)
            heat = prompt_heatmap(transformer, sae, layers, args.prompt)
            _, slug = _label(sae)
            written += figures.prompt_heatmap_figure(heat, out / f"prompt_heatmap_{slug}")
    elif args.name == "test_summary":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mlsae_core.analyse import FILES

        parts = []
        for repo in repos:
            path = repo / FILES["metrics"]
            if not path.exists():
                raise ValueError(f"{path} is missing: run `mlsae test --repo_id {repo}` first")
            parts.append(pq.read_table(path))
        table = pa.concat_tables(parts)
        path = out / "test_summary.parquet"
        atomic.write_parquet(path, table)
        written.append(path)
        from mlsae_core.sae import read_checkpoint_config

        rows = []
        for repo, part in zip(repos, parts, strict=True):
            n_latents = read_checkpoint_config(repo)["n_latents"]
            rows += [{**r, "n_latents": n_latents} for r in part.to_pylist()]
        written += tables.write_reference_test_csvs(rows, out)
        written += figures.summary_figures(table, out)
    elif args.name == "decoder_sim":
        from mlsae_core.sae import MLSAE

        for repo in repos:
            sae = MLSAE.from_pretrained(repo)
            dists = load_dists(repo)
            hist = geometry.decoder_sim_vs_layer_distance(
                sae.decoder.weight.detach(), dists.layer_mean, dists.n_layers
            )
            _, slug = _label(sae)
            written += figures.decoder_sim_figure(hist, out / f"decoder_sim_{slug}", slug)
    return written
