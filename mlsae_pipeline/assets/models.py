"""Group `models`: per model, the base transformer, its tokenized corpus, resid_cos_sim."""

from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core.config import to_dict
from mlsae_pipeline.assets import PARQUET, asset
from mlsae_pipeline.partitions import SweepPartitions
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.sweep import Sweep

GROUP = "models"


def transformer(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """The base causal LM as a local safetensors directory: the offline SmolLM2 converted once
    from its GGUF, a hub snapshot (e.g. EleutherAI/pythia-70m-deduped), a local directory, or
    a model directory under the storage root's models/ by name
    (mlsae_core.transformer.resolve_model_path). Metadata: path, layers, d_model."""
    from mlsae_pipeline import steps

    name = sweep.load().model_name(context.partition_key)
    return dg.MaterializeResult(metadata=steps.prepare_model(storage.layout, name))


def corpus(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """Tokenized train/test chunks of the sweep's dataset for one model (split by document;
    EOS-separated; BOS/EOS/PAD excluded downstream): TokenChunks.save files
    corpus/<model>/{train,test}.safetensors with JSON sidecars (document ids, genres)."""
    from mlsae_pipeline import steps

    meta = steps.build_corpus(storage.layout, sweep.load(), context.partition_key)
    return dg.MaterializeResult(metadata=meta)


def tuned_lens(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """The model's tuned lens (one affine translator per layer, trained on the training chunks
    to match the final next-token distribution; settings: the sweep's lens: section) in
    lenses/<model>/, for the configs with grid.tuned_lens true. Metadata: per-layer KL to the
    final distribution, logit lens vs tuned lens, on test chunks. A sweep with no such config
    trains nothing here."""
    from mlsae_pipeline import steps

    sw = sweep.load()
    if not sw.wants_lens:
        return dg.MaterializeResult(
            metadata={"trained": False, "why": "no config of the sweep has tuned_lens"}
        )
    return dg.MaterializeResult(
        metadata=steps.train_model_lens(storage.layout, sw, context.partition_key)
    )


def resid_cos_sim(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """Per layer: cosine similarity of centred residual vectors at adjacent layers (two passes:
    per-layer means, then per-token cosines) and activation norms, over the test split
    (eval.resid_tokens tokens). One row per layer; figure inline
    (figures/resid_cos_sim_<model>.png)."""
    from mlsae_pipeline import steps

    layout, key = storage.layout, context.partition_key
    table, meta = steps.resid_cos_sim(layout, sweep.load(), key)
    png = Path(f"{layout.model_figure_stem('resid_cos_sim', key)}.png")
    plot = dg.MetadataValue.md(steps.inline_png(png, "resid_cos_sim"))
    return dg.Output(table, metadata={**meta, "plot": plot})


def build_model_assets(parts: SweepPartitions, sw: Sweep) -> list[Any]:
    """The model assets, partitioned by the sweep's models; each code version hashes the sweep
    settings it reads (a model added to the sweep is requested by the automation sensor)."""
    from mlsae_pipeline.steps import held_out_tokens

    # what the corpus reads: the data settings, the split seed, the held-out budget and
    # what rounds the training budget up to whole optimiser steps (runs.train_token_budget)
    corpus_settings = (to_dict(sw.data), sw.train.seed, held_out_tokens(sw))
    corpus_settings += (sw.train.accumulate_grad_batches, sw.train.nproc_per_node)
    lens_settings = (to_dict(sw.lens),) if sw.wants_lens else ()
    resid_settings = (sw.eval.resid_tokens, sw.eval.batch_size)
    per_model = {"partitions_def": parts.models}
    upstream = ["transformer", "corpus"]
    return [
        asset(GROUP, {"huggingface", "pytorch"}, **per_model)(transformer),
        asset(GROUP, {"safetensors"}, corpus_settings, deps=["transformer"], **per_model)(corpus),
        asset(GROUP, {"pytorch", "safetensors"}, lens_settings, deps=upstream, **per_model)(
            tuned_lens
        ),
        asset(
            GROUP,
            {"parquet", "pytorch"},
            resid_settings,
            deps=upstream,
            io_manager_key=PARQUET,
            pool="mlsae_eval",
            **per_model,
        )(resid_cos_sim),
    ]
