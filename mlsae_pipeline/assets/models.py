"""Group `models`: per model, the base transformer, its tokenized corpus, resid_cos_sim."""

import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_pipeline.assets import CODE_VERSIONS, eager
from mlsae_pipeline.partitions import SweepPartitions
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.state import memo, upstream

GROUP = "models"


def build_model_assets(parts: SweepPartitions) -> list[Any]:
    @dg.asset(
        name="transformer",
        group_name=GROUP,
        partitions_def=parts.models,
        kinds={"huggingface", "pytorch"},
        code_version=CODE_VERSIONS["transformer"],
        automation_condition=eager(),  # a model added to the sweep is requested by the sensor
        description=(
            "The base causal LM as a local safetensors directory: the offline SmolLM2 converted "
            "once from its GGUF, a hub snapshot (e.g. EleutherAI/pythia-70m-deduped), a local "
            "directory, or a model directory under the storage root's models/ by name "
            "(mlsae_core.transformer.resolve_model_path). Metadata: path, layers, d_model."
        ),
    )
    def transformer(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime

        layout, key = storage.layout, context.partition_key
        name = sweep.load().model_name(key)
        m = memo(
            layout,
            "transformer",
            key,
            [name, str(layout.models_dir)],
            [],
            lambda: (None, runtime.prepare_model(layout, name)),
        )
        return m.result()

    @dg.asset(
        name="corpus",
        group_name=GROUP,
        partitions_def=parts.models,
        deps=["transformer"],
        kinds={"safetensors"},
        code_version=CODE_VERSIONS["corpus"],
        automation_condition=eager(),
        description=(
            "Tokenized train/test chunks of the sweep's dataset for one model (split by "
            "document; EOS-separated; BOS/EOS/PAD excluded downstream): TokenChunks.save files "
            "corpus/<model>/{train,test}.safetensors with JSON sidecars (document ids, genres)."
        ),
    )
    def corpus(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime

        layout, key, sw = storage.layout, context.partition_key, sweep.load()
        settings = [dataclasses.asdict(sw.data), sw.train.seed, runtime.test_tokens(sw)]
        m = memo(
            layout,
            "corpus",
            key,
            [*settings, upstream(layout, "transformer", key)],
            [layout.corpus_path(key, s) for s in ("train", "test")],
            lambda: (None, runtime.build_corpus(layout, sw, key)),
        )
        return m.result()

    @dg.asset(
        name="tuned_lens",
        group_name=GROUP,
        partitions_def=parts.models,
        deps=["transformer", "corpus"],
        kinds={"pytorch", "safetensors"},
        code_version=CODE_VERSIONS["tuned_lens"],
        automation_condition=eager(),
        description=(
            "The model's tuned lens (one affine translator per layer, trained on the training "
            "chunks to match the final next-token distribution; settings: the sweep's lens: "
            "section) in lenses/<model>/, for the configs with grid.tuned_lens true. Metadata: "
            "per-layer KL to the final distribution, logit lens vs tuned lens, on test chunks. "
            "A sweep with no such config trains nothing here."
        ),
    )
    def tuned_lens(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime

        layout, key, sw = storage.layout, context.partition_key, sweep.load()
        if not sw.wants_lens:
            return dg.MaterializeResult(
                metadata={"trained": False, "why": "no config of the sweep has tuned_lens"}
            )
        m = memo(
            layout,
            "tuned_lens",
            key,
            [dataclasses.asdict(sw.lens), upstream(layout, "corpus", key)],
            [layout.lens_dir(key) / "lens.safetensors", layout.lens_dir(key) / "config.json"],
            lambda: (None, runtime.train_model_lens(layout, sw, key)),
        )
        return m.result()

    @dg.asset(
        name="resid_cos_sim",
        group_name=GROUP,
        partitions_def=parts.models,
        deps=["transformer", "corpus"],
        io_manager_key="parquet_io_manager",
        kinds={"parquet", "pytorch"},
        code_version=CODE_VERSIONS["resid_cos_sim"],
        automation_condition=eager(),
        pool="mlsae_eval",
        description=(
            "Per layer: cosine similarity of centred residual vectors at adjacent layers (two "
            "passes: per-layer means, then per-token cosines) and activation norms, over the "
            "test split (eval.resid_tokens tokens). One row per layer; figure inline "
            "(figures/resid_cos_sim_<model>.png)."
        ),
    )
    def resid_cos_sim(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime
        from mlsae_pipeline.io import read_table, table_path

        layout, key, sw = storage.layout, context.partition_key, sweep.load()
        path = table_path(layout, "resid_cos_sim", key)
        png = Path(f"{layout.model_figure_stem('resid_cos_sim', key)}.png")
        m = memo(
            layout,
            "resid_cos_sim",
            key,
            [sw.eval.resid_tokens, sw.eval.batch_size, upstream(layout, "corpus", key)],
            [path, png],
            lambda: runtime.resid_cos_sim(layout, sw, key),
            load=lambda: read_table(path),
        )
        return m.output(plot=dg.MetadataValue.md(runtime.inline_png(png, "resid_cos_sim")))

    return [transformer, corpus, tuned_lens, resid_cos_sim]
