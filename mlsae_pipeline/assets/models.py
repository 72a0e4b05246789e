"""Group `models`: per model, the base transformer, its tokenized corpus, resid_cos_sim."""

import math
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core.config import to_dict
from mlsae_pipeline import ui
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
    from mlsae_core.transformer import model_card, resolve_model_path

    name = sweep.load().model_name(context.partition_key)
    path = resolve_model_path(name, storage.layout.models_dir, snapshot=True)
    return dg.MaterializeResult(metadata={"model_name": name, **model_card(path)})


def corpus(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """Tokenized train/test chunks of the sweep's dataset for one model (split by document;
    EOS-separated; BOS/EOS/PAD excluded downstream): TokenChunks.save files
    corpus/<model>/{train,test}.safetensors with JSON sidecars (document ids, genres)."""
    from mlsae_core.data import write_splits
    from mlsae_core.transformer import resolve_model_path

    layout, sw, model = storage.layout, sweep.load(), context.partition_key
    path = resolve_model_path(sw.model_name(model), layout.models_dir, snapshot=True)
    budgets = {"train": sw.train_tokens(model), "test": sw.held_out_tokens}
    paths = {split: layout.corpus_path(model, split) for split in budgets}
    meta = write_splits(sw.data, sw.train.seed, Path(path), budgets, paths, layout.sources_dir)
    return dg.MaterializeResult(metadata={**meta, "files": ui.files(layout, meta["files"])})


def tuned_lens(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """The model's tuned lens (one affine translator per layer, trained on the training chunks
    to match the final next-token distribution; settings: the sweep's lens: section) in
    lenses/<model>/, for the configs with grid.tuned_lens true. Metadata: per-layer KL to the
    final distribution, logit lens vs tuned lens, on test chunks. A sweep with no such config
    trains nothing here."""
    from mlsae_core.chunks import TokenChunks
    from mlsae_core.lens import fit_lens
    from mlsae_core.transformer import Transformer

    layout, sw, model = storage.layout, sweep.load(), context.partition_key
    if not sw.wants_lens:
        return dg.MaterializeResult(
            metadata={"trained": False, "why": "no config of the sweep has tuned_lens"}
        )
    tr = Transformer.load(sw.model_name(model), sw.lens.device, models_dir=layout.models_dir)
    train, test = (TokenChunks.load(layout.corpus_path(model, s)) for s in ("train", "test"))
    lens = fit_lens(tr, train, test, sw.lens, progress=ui.terminal_progress())
    lens.save(layout.lens_dir(model))
    rows = lens.kl_table or []
    kl = ("layer", "kl_logit_lens", "kl_tuned_lens")
    meta = {
        "lens": str(layout.lens_dir(model)),
        "files": ui.files(
            layout, [layout.lens_dir(model) / f for f in ("lens.safetensors", "config.json")]
        ),
        **{f"{k}_mean": sum(r[k] for r in rows) / max(1, len(rows)) for k in kl[1:]},
        "kl_by_layer": [{k: r[k] for k in kl} for r in rows],
    }
    return dg.MaterializeResult(metadata=meta)


def resid_cos_sim(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """Per layer: cosine similarity of centred residual vectors at adjacent layers (two passes:
    per-layer means, then per-token cosines) and activation norms, over the test split
    (eval.resid_tokens tokens). One row per layer; figure inline
    (figures/resid_cos_sim_<model>.png)."""
    from mlsae_core import figures
    from mlsae_core.analysis import geometry, tables
    from mlsae_core.chunks import TokenChunks
    from mlsae_core.transformer import Transformer

    layout, sw, model = storage.layout, sweep.load(), context.partition_key
    tr = Transformer.load(sw.model_name(model), sw.eval.device, models_dir=layout.models_dir)
    test = TokenChunks.load(layout.corpus_path(model, "test"))
    n = min(len(test), max(1, math.ceil(sw.eval.resid_tokens / test.tokens.shape[1])))
    batches = geometry.transformer_batches(
        tr, test.tokens[:n], test.mask()[:n], None, sw.eval.batch_size
    )
    res = geometry.resid_cos_sim(batches, list(range(tr.n_layers)))
    stem = layout.model_figure_stem("resid_cos_sim", model)
    pngs = [p for p in figures.resid_cos_sim_figure(res, stem, f"{model}: residual stream")
            if p.suffix == ".png"]  # fmt: skip
    table = tables.resid_cos_sim_table(res, {"model": model})
    meta = {"n_tokens": res.n_tokens, "files": ui.files(layout, pngs)}
    return dg.Output(table, metadata={**meta, "plot": ui.md(ui.figures_md(pngs))})


def residual_probes(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """The ceiling of k-sparse probing (analysis.probing): per layer and sae-probes dataset of
    the sweep's probe: section, a logistic regression on the whole residual vector at the
    prompt's last token. Once per model: every config's `probes` rows compare with these
    (the `probes` view of results.duckdb holds both)."""
    from mlsae_core.analysis import probing
    from mlsae_core.transformer import Transformer

    layout, sw, model = storage.layout, sweep.load(), context.partition_key
    sets = probing.load_datasets(sw.probe)
    tr = Transformer.load(sw.model_name(model), sw.eval.device, models_dir=layout.models_dir)
    table = probing.probe(tr, sets, {"model": model}, max_k=sw.probe.max_k)
    return dg.Output(table, metadata={"table": ui.md(ui.table_md(table))})


def build_model_assets(parts: SweepPartitions, sw: Sweep) -> list[Any]:
    """The model assets, partitioned by the sweep's models; each code version hashes the sweep
    settings it reads (a model added to the sweep is requested by the automation sensor)."""
    # what the corpus reads: the data settings, the split seed, the held-out budget and
    # what rounds the training budget up to whole optimiser steps (data.train_token_budget)
    corpus_settings = (to_dict(sw.data), sw.train.seed, sw.held_out_tokens)
    corpus_settings += (sw.train.accumulate_grad_batches, sw.train.nproc_per_node)
    lens_settings = (to_dict(sw.lens),) if sw.wants_lens else ()
    resid_settings = (sw.eval.resid_tokens, sw.eval.batch_size)
    per_model = {"partitions_def": parts.models}
    upstream = ["transformer", "corpus"]
    probing = []
    if sw.probe is not None:  # the probe: section of the sweep asks for probes
        probe_settings = (to_dict(sw.probe), sw.eval.device)
        probing.append(asset(GROUP, {"parquet", "pytorch"}, probe_settings, deps=["transformer"],
                             io_manager_key=PARQUET, pool="mlsae_eval", **per_model)(residual_probes))  # fmt: skip
    return [
        *probing,
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
