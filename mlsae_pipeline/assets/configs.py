"""Groups `training`, `evaluation`, `figures`: everything per (model x SAE config) partition.

`mlsae` trains the checkpoint (in-process, or across processes with torchrun through Dagster
Pipes when the sweep sets train.nproc_per_node > 1). `evaluation` is ONE pass of
`mlsae_core.evaluate.evaluate` with the layer-distribution and max-example collectors riding
along; it materializes three table assets (test_metrics, latent_dists, max_examples) and
runs their checks on the in-memory data.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_pipeline.assets import CODE_VERSIONS, eager
from mlsae_pipeline.partitions import SweepPartitions, split_config_key
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.state import cached, fingerprint, read_record, record, upstream_fp

EVAL_TABLES = ("test_metrics", "latent_dists", "max_examples")
# The per-(layer, latent) distributions beside the tables: the same Parquet form that
# `mlsae analyse` writes (tables.latent_layer_dists_table), read back exactly.
DISTS_FILE = "latent_layer_dists.parquet"
EVAL_CHECKS = {
    "test_metrics": ("no_nan", "fvu_in_bounds", "dead_fraction_in_bounds"),
    "latent_dists": ("no_nan", "dists_sum_to_one"),
    "max_examples": ("examples_for_live_latents", "examples_no_nan"),
}


def _keys(context: dg.AssetExecutionContext) -> tuple[str, str]:
    return split_config_key(context.partition_key)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def build_config_assets(parts: SweepPartitions) -> list[Any]:
    model_dep = parts.to_model

    @dg.asset(
        name="mlsae",
        group_name="training",
        partitions_def=parts.configs,
        deps=[
            dg.AssetDep("transformer", partition_mapping=model_dep),
            dg.AssetDep("corpus", partition_mapping=model_dep),
        ],
        kinds={"pytorch", "safetensors"},
        code_version=CODE_VERSIONS["mlsae"],
        automation_condition=eager(),
        pool="mlsae_train",
        description=(
            "A trained MLSAE (one TopK SAE over the residual stream of every layer in the "
            "config's layer set; one layer = a single-layer baseline): checkpoint directory "
            "(model.safetensors + config.json) and its training curve (history.parquet). "
            "Skips training when the checkpoint exists with the same settings."
        ),
    )
    def mlsae(
        context: dg.AssetExecutionContext,
        storage: Storage,
        sweep: SweepResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ):
        from mlsae_core.train import read_history
        from mlsae_pipeline import runtime

        model, sae_key = _keys(context)
        sw = sweep.load()
        point = sw.point(sae_key)
        path = runtime.model_path(storage, sw.model_name(model), model)
        spec = runtime.run_spec(sw, point, path)
        out = storage.sae_dir(model, sae_key)
        part = context.partition_key
        fp = fingerprint(
            CODE_VERSIONS["mlsae"],
            runtime.spec_dict(spec),
            sw.nproc_per_node,
            upstream_fp(storage, "corpus", model),
        )
        curve = storage.figures_dir(model, sae_key) / "training_curve"
        png = curve.with_name(curve.name + ".png")
        outputs = [out / "model.safetensors", out / "config.json", png]
        hit = cached(storage, "mlsae", part, fp, outputs)
        skipped = hit is not None
        if hit is None:
            prev = read_record(storage, "mlsae", part)
            if prev is not None and out.exists():
                # settings changed since that checkpoint: start over rather than resume
                context.log.info("settings changed; removing the old checkpoint %s", out)
                shutil.rmtree(out)
            chunks = storage.corpus_path(model, "train")
            if sw.nproc_per_node > 1:
                meta = _train_with_torchrun(
                    context, pipes_subprocess_client, spec, out, chunks, sw.nproc_per_node
                )
            else:
                last = [0.0]

                def on_step(row: dict[str, Any]) -> None:
                    # progress in the run's log, at most every 10 s
                    if row["step"] == 0 or row["elapsed_s"] - last[0] >= 10:
                        last[0] = row["elapsed_s"]
                        context.log.info(
                            "step %d: %d tokens, fvu %.4f, dead %.3f, %.0f tok/s",
                            row["step"],
                            row["tokens"],
                            row["fvu"],
                            row["dead_fraction"],
                            row["tokens_per_s"],
                        )

                # several configs of one model share one transformer pass (activation cache)
                shared = storage.path / "cache" / model if len(sw.points) > 1 else None
                meta = runtime.train_sae(spec, out, chunks, on_step=on_step, cache_dir=shared)
            hist = read_history(out)
            runtime.training_curve_figure(hist, curve, f"{model} {sae_key}")
            meta["curve"] = str(png)
            record(storage, "mlsae", part, fp, meta)
            hit = meta
        hist = read_history(out)
        step_every = max(1, len(hist) // 10)
        curve_md = "| step | tokens | fvu | dead | l0 |\n|---|---|---|---|---|\n" + "\n".join(
            f"| {r['step']} | {r['tokens']} | {r['fvu']:.4f} | {r['dead_fraction']:.3f} | "
            f"{r['l0']:.1f} |"
            for r in hist[::step_every] + hist[-1:]
        )
        return dg.MaterializeResult(
            metadata={
                **hit,
                "checkpoint": dg.MetadataValue.path(str(out)),
                "skipped": skipped,
                "fingerprint": fp,
                "training_curve": dg.MetadataValue.md(
                    runtime.inline_png(png, "training curve") + "\n\n" + curve_md
                ),
            },
            data_version=dg.DataVersion(fp),
        )

    outs = {
        "test_metrics": dg.AssetOut(
            group_name="evaluation",
            io_manager_key="parquet_io_manager",
            kinds={"parquet", "pytorch"},
            code_version=CODE_VERSIONS["evaluation"],
            automation_condition=eager(),
            description=(
                "Held-out metrics per layer plus an 'avg' row: MSE, FVU, L0, L1, dead fraction, "
                "and splice metrics (dCE, KL, logit MSE, CE clean/spliced/zero-ablated, loss "
                "recovered) over the first eval.splice_tokens tokens."
            ),
        ),
        "latent_dists": dg.AssetOut(
            group_name="evaluation",
            io_manager_key="parquet_io_manager",
            kinds={"parquet", "pytorch"},
            code_version=CODE_VERSIONS["evaluation"],
            automation_condition=eager(),
            description=(
                "Each latent's distribution over layers: layer_mean, layer_var, layer_std of "
                "p[l, j] = totals[l, j] / sum_l totals[l, j], counts, live flag (docs/tables.md)."
            ),
        ),
        "max_examples": dg.AssetOut(
            group_name="evaluation",
            io_manager_key="parquet_io_manager",
            kinds={"parquet", "pytorch"},
            code_version=CODE_VERSIONS["evaluation"],
            automation_condition=eager(),
            description=(
                "Top eval.n_examples tokens per (latent, layer) with +-eval.n_context tokens of "
                "context and the latent's activation on each (docs/tables.md: max_examples)."
            ),
        ),
    }
    check_specs = [
        dg.AssetCheckSpec(name, asset=asset)
        for asset, names in EVAL_CHECKS.items()
        for name in names
    ]

    @dg.multi_asset(
        name="evaluation",
        outs=outs,
        partitions_def=parts.configs,
        deps=[
            "mlsae",
            dg.AssetDep("transformer", partition_mapping=model_dep),
            dg.AssetDep("corpus", partition_mapping=model_dep),
        ],
        check_specs=check_specs,
        pool="mlsae_eval",
        description="One evaluation pass: test metrics, layer distributions, max examples.",
    )
    def evaluation(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import checks
        from mlsae_pipeline.io import read_table

        model, sae_key = _keys(context)
        part = context.partition_key
        sw = sweep.load()
        point = sw.point(sae_key)
        fp = fingerprint(
            CODE_VERSIONS["evaluation"],
            sw.eval.__dict__,
            upstream_fp(storage, "mlsae", part),
            upstream_fp(storage, "corpus", model),
        )
        dists_file = storage.eval_dir(model, sae_key) / DISTS_FILE
        paths = {name: storage.table_path(name, part) for name in EVAL_TABLES}
        hit = cached(storage, "evaluation", part, fp, [*paths.values(), dists_file])
        if hit is not None:
            tables_out = {name: read_table(p) for name, p in paths.items()}
            meta, skipped = hit, True
        else:
            tables_out, meta = _evaluate(storage, sw, model, sae_key, point, dists_file, context)
            record(storage, "evaluation", part, fp, meta)
            skipped = False
        for name in EVAL_TABLES:
            yield dg.Output(
                tables_out[name],
                output_name=name,
                data_version=dg.DataVersion(fp),
                metadata={**meta.get(name, {}), "skipped": skipped, "fingerprint": fp},
            )
        p_sums = _p_sums(dists_file)
        outcomes = {
            "test_metrics": checks.test_metrics_checks(
                tables_out["test_metrics"], sw.checks, sw.eval.splice_tokens > 0
            ),
            "latent_dists": checks.latent_dists_checks(tables_out["latent_dists"], p_sums),
            "max_examples": checks.max_examples_checks(
                tables_out["max_examples"], tables_out["latent_dists"]
            ),
        }
        for asset, results in outcomes.items():
            for outcome in results:
                yield outcome.result(asset)

    @dg.asset(
        name="dists_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        deps=["latent_dists"],
        kinds={"matplotlib", "pdf"},
        code_version=CODE_VERSIONS["dists_heatmap"],
        automation_condition=eager(),
        description=(
            "Heatmap of p[layer, latent] for live latents sorted by mean layer, plus the "
            "histogram of latents' mean layers (PNG + PDF; shown inline)."
        ),
    )
    def dists_heatmap(context: dg.AssetExecutionContext, storage: Storage):
        from mlsae_pipeline import runtime

        model, sae_key = _keys(context)
        part = context.partition_key
        fp = fingerprint(CODE_VERSIONS["dists_heatmap"], upstream_fp(storage, "evaluation", part))
        fig_dir = storage.figures_dir(model, sae_key)
        png = fig_dir / "dists_heatmap.png"
        hist_png = fig_dir / "layer_mean_histogram.png"
        hit = cached(storage, "dists_heatmap", part, fp, [png, hist_png])
        skipped = hit is not None
        if hit is None:
            from mlsae_core import figures

            dr = _load_dists(storage.eval_dir(model, sae_key) / DISTS_FILE)
            figures.dists_heatmap(dr, fig_dir / "dists_heatmap", title=f"{model} {sae_key}")
            figures.layer_mean_histogram(dr, fig_dir / "layer_mean_histogram", title=sae_key)
            hit = {
                "png": str(png),
                "pdf": str(png.with_suffix(".pdf")),
                "n_live": int(dr.live.sum()),
            }
            record(storage, "dists_heatmap", part, fp, hit)
        return dg.MaterializeResult(
            metadata={
                **hit,
                "skipped": skipped,
                "heatmap": dg.MetadataValue.md(
                    runtime.inline_png(png, "dists heatmap")
                    + "\n\n"
                    + runtime.inline_png(hist_png, "layer mean histogram")
                ),
            },
            data_version=dg.DataVersion(fp),
        )

    @dg.asset(
        name="prompt_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        deps=["mlsae", dg.AssetDep("transformer", partition_mapping=model_dep)],
        kinds={"matplotlib", "pdf"},
        code_version=CODE_VERSIONS["prompt_heatmap"],
        automation_condition=eager(),
        pool="mlsae_eval",
        description=(
            "For the sweep's eval.prompt: each latent's activation summed over tokens per "
            "layer, normalised over layers, latents sorted by mean layer (PNG + PDF inline; "
            "long-form Parquet beside it)."
        ),
    )
    def prompt_heatmap(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime

        model, sae_key = _keys(context)
        part = context.partition_key
        sw = sweep.load()
        fp = fingerprint(
            CODE_VERSIONS["prompt_heatmap"], sw.eval.prompt, upstream_fp(storage, "mlsae", part)
        )
        fig_dir = storage.figures_dir(model, sae_key)
        png = fig_dir / "prompt_heatmap.png"
        table_path = storage.table_path("prompt_heatmap", part)
        hit = cached(storage, "prompt_heatmap", part, fp, [png, table_path])
        skipped = hit is not None
        if hit is None:
            from mlsae_core import atomic, figures
            from mlsae_core.analysis import prompts, tables
            from mlsae_core.runs import resolve_layers
            from mlsae_core.sae import MLSAE

            tr = runtime.load_transformer(
                runtime.model_path(storage, sw.model_name(model), model), sw.train.device
            )
            sae = MLSAE.from_pretrained(storage.sae_dir(model, sae_key))
            layers = resolve_layers(sw.point(sae_key).layers, tr.n_layers)
            heat = prompts.prompt_heatmap(tr, sae, layers, prompt=sw.eval.prompt)
            figures.prompt_heatmap_figure(heat, fig_dir / "prompt_heatmap")
            cols = runtime.partition_columns(model, sw.point(sae_key), layers)
            atomic.write_parquet(table_path, tables.prompt_heatmap_table(heat, cols))
            hit = {
                "png": str(png),
                "pdf": str(png.with_suffix(".pdf")),
                "table": str(table_path),
                "n_latents_active": int(heat.latents.numel()),
                "tokens": " ".join(heat.tokens),
            }
            record(storage, "prompt_heatmap", part, fp, hit)
        return dg.MaterializeResult(
            metadata={
                **hit,
                "skipped": skipped,
                "heatmap": dg.MetadataValue.md(runtime.inline_png(png, "prompt heatmap")),
            },
            data_version=dg.DataVersion(fp),
        )

    return [mlsae, evaluation, dists_heatmap, prompt_heatmap]


# ----- helpers ------------------------------------------------------------------------------
def _train_with_torchrun(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    spec: Any,
    out: Path,
    chunks: Path,
    nproc: int,
) -> dict[str, Any]:
    """Train across `nproc` processes: torchrun runs mlsae_pipeline.ddp_train under Pipes."""
    from mlsae_core import atomic
    from mlsae_pipeline import runtime

    job = out.parent / f".{out.name}.ddp.json"
    atomic.write_json(
        job, {"spec": runtime.spec_dict(spec), "out_dir": str(out), "chunks": str(chunks)}
    )
    cmd = [
        *_torchrun(),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "mlsae_pipeline.ddp_train",
        "--job",
        str(job),
    ]
    context.log.info("launching %s", " ".join(cmd))
    invocation = client.run(command=cmd, context=context, env={"OMP_NUM_THREADS": "1"})
    reported = invocation.get_materialize_result()
    meta: dict[str, Any] = {}
    for k, v in (reported.metadata or {}).items():
        meta[k] = getattr(v, "value", v)
    meta["launcher"] = "torchrun via Dagster Pipes"
    return json.loads(json.dumps(meta, default=str))


def _evaluate(
    storage: Storage,
    sw: Any,
    model: str,
    sae_key: str,
    point: Any,
    dists_file: Path,
    context: dg.AssetExecutionContext,
) -> tuple[dict[str, Any], dict[str, Any]]:
    import time

    from mlsae_core import atomic
    from mlsae_core.analyse import one_pass
    from mlsae_core.analysis import tables
    from mlsae_core.evaluate import resolve_delta_dtype
    from mlsae_core.runs import metrics_table, resolve_layers
    from mlsae_core.sae import MLSAE
    from mlsae_pipeline import runtime

    t0 = time.perf_counter()
    ev = sw.eval
    tr = runtime.load_transformer(
        runtime.model_path(storage, sw.model_name(model), model), sw.train.device
    )
    sae = MLSAE.from_pretrained(storage.sae_dir(model, sae_key), device=str(tr.device))
    test = runtime.load_chunks(storage, model, "test")
    layers = resolve_layers(point.layers, tr.n_layers)
    analyses = ("metrics", "dists", "examples") if ev.splice_tokens > 0 else ("dists", "examples")
    result = one_pass(
        tr,
        sae,
        test,
        layers,
        analyses,
        max_tokens=ev.tokens,
        batch_size=ev.batch_size,
        splice_max_tokens=ev.splice_tokens,
        n_examples=ev.n_examples,
        n_context=ev.n_context,
        progress=False,
        delta_dtype=ev.delta_dtype,
    )
    context.log.info("evaluated %d tokens in %.1fs", result.n_tokens, time.perf_counter() - t0)
    cols = runtime.partition_columns(model, point, layers)
    metrics = metrics_table(result.metrics_rows, cols)
    dr = result.dists
    atomic.write_parquet(dists_file, tables.latent_layer_dists_table(dr, cols))
    latent = tables.latent_dists_table(dr, cols)
    ex = result.examples
    max_ex = tables.max_examples_table(ex, cols, test.doc_index, test.documents)
    avg = next(r for r in result.metrics_rows if r["layer"] == "avg")
    meta = {
        "test_metrics": {
            "n_tokens": result.n_tokens,
            "splice_tokens": ev.splice_tokens,
            "delta_dtype": str(resolve_delta_dtype(ev.delta_dtype, tr.device)).removeprefix(
                "torch."
            ),
            "fvu": avg["fvu"],
            "l0": avg["l0"],
            "dead": avg["dead"],
            "dce": avg["dce"],
        },
        "latent_dists": {"n_live": int(dr.live.sum()), "n_latents": dr.n_latents},
        "max_examples": {"n_examples": len(ex), "dists_file": str(dists_file)},
        "seconds": time.perf_counter() - t0,
    }
    meta = json.loads(json.dumps(meta, default=str).replace("NaN", "null"))
    return {"test_metrics": metrics, "latent_dists": latent, "max_examples": max_ex}, meta


def _load_dists(path: Path) -> Any:
    import pyarrow.parquet as pq

    from mlsae_core.analysis.tables import dists_from_layer_table

    return dists_from_layer_table(pq.read_table(path))


def _p_sums(path: Path) -> Any:
    if not path.exists():
        return None
    import torch

    dr = _load_dists(path)
    return torch.nan_to_num(dr.p, nan=0.0).sum(0).numpy()
