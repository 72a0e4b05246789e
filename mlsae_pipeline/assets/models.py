"""Group `models`: per model, the base transformer, its tokenized corpus, resid_cos_sim."""

import math
from typing import Any

import dagster as dg

from mlsae_pipeline.assets import CODE_VERSIONS, eager
from mlsae_pipeline.partitions import SweepPartitions
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.state import cached, fingerprint, record, upstream_fp

GROUP = "models"


def _result(meta: dict[str, Any], fp: str, skipped: bool, **extra: Any) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={**meta, **extra, "skipped": skipped, "fingerprint": fp},
        data_version=dg.DataVersion(fp),
    )


def build_model_assets(parts: SweepPartitions) -> list[Any]:
    @dg.asset(
        name="transformer",
        group_name=GROUP,
        partitions_def=parts.models,
        kinds={"huggingface", "pytorch"},
        code_version=CODE_VERSIONS["transformer"],
        description=(
            "The base causal LM as a local safetensors directory: the offline SmolLM2 converted "
            "once from its GGUF, a hub snapshot (e.g. EleutherAI/pythia-70m-deduped), a local "
            "directory, or a tiny random model (tiny-llama) built in-process. Metadata: path, "
            "layers, d_model."
        ),
    )
    def transformer(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime

        key = context.partition_key
        name = sweep.load().model_name(key)
        path = runtime.model_path(storage, name, key)
        fp = fingerprint(CODE_VERSIONS["transformer"], name, str(path))
        hit = cached(storage, "transformer", key, fp, [path / "config.json"])
        if hit is not None:
            return _result(hit, fp, True)
        path, how = runtime.prepare_model(storage, name, key)
        meta = {"model_name": name, "path": str(path), "source": how, **runtime.model_info(path)}
        record(storage, "transformer", key, fp, meta)
        return _result(meta, fp, False)

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

        key = context.partition_key
        sw = sweep.load()
        name = sw.model_name(key)
        path = runtime.model_path(storage, name, key)
        settings = {
            "data": sw.data.__dict__,
            "seed": sw.train.seed,
            "test_tokens": max(sw.eval.tokens, sw.eval.resid_tokens),
        }
        fp = fingerprint(
            CODE_VERSIONS["corpus"], settings, upstream_fp(storage, "transformer", key)
        )
        outputs = [storage.corpus_path(key, s) for s in ("train", "test")]
        hit = cached(storage, "corpus", key, fp, outputs)
        if hit is not None:
            return _result(hit, fp, True)
        meta = {"dataset": sw.data.dataset, "max_length": sw.data.max_length}
        meta.update(runtime.build_corpus(storage, sw, path, key))
        record(storage, "corpus", key, fp, meta)
        return _result(meta, fp, False)

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
            "test split (eval.resid_tokens tokens). One row per layer; figure inline."
        ),
    )
    def resid_cos_sim(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime
        from mlsae_pipeline.io import read_table

        key = context.partition_key
        sw = sweep.load()
        path = runtime.model_path(storage, sw.model_name(key), key)
        fp = fingerprint(
            CODE_VERSIONS["resid_cos_sim"],
            sw.eval.resid_tokens,
            sw.eval.batch_size,
            upstream_fp(storage, "corpus", key),
        )
        table_path = storage.table_path("resid_cos_sim", key)
        fig = storage.figures_dir(key) / "resid_cos_sim"
        png = fig.with_name(fig.name + ".png")
        hit = cached(storage, "resid_cos_sim", key, fp, [table_path, png])
        if hit is not None:
            table, meta, skipped = read_table(table_path), hit, True
        else:
            from mlsae_core import figures
            from mlsae_core.analysis import geometry, tables

            tr = runtime.load_transformer(path, sw.train.device)
            test = runtime.load_chunks(storage, key, "test")
            n = min(len(test), max(1, math.ceil(sw.eval.resid_tokens / test.tokens.shape[1])))
            source = geometry.transformer_batches(
                tr, test.tokens[:n], test.mask()[:n], None, sw.eval.batch_size
            )
            res = geometry.resid_cos_sim(source, list(range(tr.n_layers)))
            table = tables.resid_cos_sim_table(res, {"model": key})
            figures.resid_cos_sim_figure(res, fig, title=f"{key}: residual stream")
            meta = {"n_tokens": res.n_tokens, "figure": str(png)}
            record(storage, "resid_cos_sim", key, fp, meta)
            skipped = False
        return dg.Output(
            table,
            data_version=dg.DataVersion(fp),
            metadata={
                **meta,
                "skipped": skipped,
                "plot": dg.MetadataValue.md(runtime.inline_png(png, "resid_cos_sim")),
            },
        )

    return [transformer, corpus, resid_cos_sim]
