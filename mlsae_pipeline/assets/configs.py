"""Groups `training`, `evaluation`, `figures`: everything per (model x SAE config) partition.

`mlsae` trains the checkpoint into its run directory (in-process, or across processes with
torchrun through Dagster Pipes when the sweep sets train.nproc_per_node > 1). `evaluation`
is ONE pass of `mlsae_core.analyse.one_pass`; it materializes every table of
`analyse.analysis_tables` as an asset of the same name, which the IO manager writes into the
run directory under the file names `mlsae analyse` uses, and runs their checks on the
in-memory tables. The figures land in the run directory too.
"""

import shutil
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from mlsae_core.layout import RUN_TABLES
from mlsae_pipeline.assets import CODE_VERSIONS, eager
from mlsae_pipeline.partitions import SweepPartitions, split_config_key
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.state import memo, read_record, upstream

# The per-run tables of one evaluation pass: every per-run table but the prompt heatmap's.
EVAL_TABLES = tuple(name for name in RUN_TABLES if name != "prompt_heatmap")
EVAL_DESCRIPTIONS = {
    "test_metrics": (
        "Held-out metrics per layer plus an 'avg' row: MSE, FVU, L0, L1, dead fraction, and "
        "splice metrics (dCE, KL, logit MSE, CE clean/spliced/zero-ablated, loss recovered) "
        "over the first eval.splice_max_tokens tokens."
    ),
    "latent_dists": (
        "Each latent's distribution over layers: layer_mean, layer_var, layer_std of "
        "p[l, j] = totals[l, j] / sum_l totals[l, j], counts, live flag (docs/tables.md)."
    ),
    "latent_layer_dists": (
        "Long form of the layer distributions: one row per (layer, latent) where the latent "
        "fired (count, total, p); its schema metadata rebuilds the DistsResult exactly."
    ),
    "dists_summary": (
        "One row: mean/var/std/sem of live latents' layer_std, and of layer_std / n_layers."
    ),
    "layer_variance": (
        "One row: token-level vs aggregate layer variance of the latents (the paper's ~100x "
        "comparison; docs/tables.md)."
    ),
    "latent_variance": "Per latent: token-level and aggregate layer variance, weight, pairs.",
    "max_examples": (
        "Top eval.n_examples tokens per (latent, layer) with +-eval.n_context tokens of "
        "context and the latent's activation on each (docs/tables.md: max_examples)."
    ),
}
EVAL_CHECKS = {
    "test_metrics": ("no_nan", "fvu_in_bounds", "dead_fraction_in_bounds"),
    "latent_dists": ("no_nan", "dists_sum_to_one"),
    "max_examples": ("examples_for_live_latents", "examples_no_nan"),
}


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _log_progress(context: dg.AssetExecutionContext) -> Any:
    """An on_step callback: training progress in the run's log, at most every 10 s."""
    last = [0.0]

    def on_step(row: dict[str, Any]) -> None:
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

    return on_step


def build_config_assets(parts: SweepPartitions) -> list[Any]:
    model_dep = parts.to_model

    @dg.asset(
        name="mlsae",
        group_name="training",
        partitions_def=parts.configs,
        deps=[
            dg.AssetDep("transformer", partition_mapping=model_dep),
            dg.AssetDep("corpus", partition_mapping=model_dep),
            dg.AssetDep("tuned_lens", partition_mapping=model_dep),
        ],
        kinds={"pytorch", "safetensors"},
        code_version=CODE_VERSIONS["mlsae"],
        automation_condition=eager(),
        pool="mlsae_train",
        description=(
            "A trained MLSAE (one TopK SAE over the residual stream of every layer in the "
            "config's layer set; one layer = a single-layer baseline): the run directory "
            "saes/<model>/<sae>/ with model.safetensors + config.json, history.parquet and "
            "training_curve.png. Skips training when the checkpoint exists with the same "
            "settings."
        ),
    )
    def mlsae(
        context: dg.AssetExecutionContext,
        storage: Storage,
        sweep: SweepResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ):
        from mlsae_core.config import spec_to_dict
        from mlsae_pipeline import runtime

        layout, part, sw = storage.layout, context.partition_key, sweep.load()
        model, sae_key = split_config_key(part)
        run = layout.run(model, sae_key)
        point = sw.point(sae_key)
        spec = sw.run_spec(point, sw.model_name(model), layout.lens_dir(model))

        def train() -> tuple[None, dict[str, Any]]:
            if read_record(layout, "mlsae", part) is not None and run.directory.exists():
                # trained before with other settings: start over rather than resume
                context.log.info("settings changed; removing the old run %s", run.directory)
                shutil.rmtree(run.directory)
            chunks = layout.corpus_path(model, "train")
            if spec.train.nproc_per_node > 1:
                meta = _train_with_torchrun(
                    context, pipes_subprocess_client, spec, run, chunks, layout.root
                )
            else:
                # several configs of one model share one transformer pass (activation cache)
                shared = layout.cache_dir(model) if len(sw.points) > 1 else None
                meta = runtime.train_sae(
                    spec,
                    run.directory,
                    chunks,
                    layout.root,
                    _log_progress(context),
                    runtime.terminal_progress(),
                    shared,
                )
            runtime.training_curve(layout, model, sae_key)
            return None, meta

        m = memo(
            layout,
            "mlsae",
            part,
            [
                spec_to_dict(spec),
                upstream(layout, "corpus", model),
                upstream(layout, "tuned_lens", model) if point.tuned_lens else None,
            ],
            [run.weights, run.config, run.figure("training_curve")],
            train,
        )
        return m.result(
            checkpoint=dg.MetadataValue.path(str(run.directory)),
            training_curve=dg.MetadataValue.md(_curve_md(run)),
        )

    outs = {
        name: dg.AssetOut(
            group_name="evaluation",
            io_manager_key="parquet_io_manager",
            kinds={"parquet", "pytorch"},
            code_version=CODE_VERSIONS["evaluation"],
            automation_condition=eager(),
            description=EVAL_DESCRIPTIONS[name],
        )
        for name in EVAL_TABLES
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
        description=(
            "One evaluation pass (analyse.one_pass): test metrics, layer distributions, layer "
            "variance, max examples; every table of analyse.analysis_tables."
        ),
    )
    def evaluation(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_core.config import to_dict
        from mlsae_pipeline import checks, runtime
        from mlsae_pipeline.io import read_table, table_path

        layout, part, sw = storage.layout, context.partition_key, sweep.load()
        model, sae_key = split_config_key(part)
        paths = {name: table_path(layout, name, part) for name in EVAL_TABLES}
        m = memo(
            layout,
            "evaluation",
            part,
            [to_dict(sw.eval), upstream(layout, "mlsae", part), upstream(layout, "corpus", model)],
            paths.values(),
            lambda: runtime.evaluate(layout, sw, model, sw.point(sae_key)),
            load=lambda: {name: read_table(p) for name, p in paths.items()},
        )
        for name in EVAL_TABLES:
            yield m.output(m.value[name], output_name=name, metadata=m.metadata.get(name, {}))
        outcomes = checks.evaluation_checks(m.value, sw.checks, sw.eval.spliced_tokens > 0)
        for asset, results in outcomes.items():
            for outcome in results:
                yield outcome.result(asset)

    @dg.asset(
        name="dists_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        ins={"latent_layer_dists": dg.AssetIn("latent_layer_dists")},
        kinds={"matplotlib", "pdf"},
        code_version=CODE_VERSIONS["dists_heatmap"],
        automation_condition=eager(),
        description=(
            "Heatmap of p[layer, latent] for live latents sorted by mean layer, plus the "
            "histogram of latents' mean layers (dists_heatmap / layer_mean_hist .png + .pdf in "
            "the run directory, as `mlsae analyse` writes them; shown inline)."
        ),
    )
    def dists_heatmap(
        context: dg.AssetExecutionContext,
        storage: Storage,
        sweep: SweepResource,
        latent_layer_dists: Any,
    ):
        from mlsae_pipeline import runtime

        layout, part, sw = storage.layout, context.partition_key, sweep.load()
        model, sae_key = split_config_key(part)
        run = layout.run(model, sae_key)

        def draw() -> tuple[None, dict[str, Any]]:
            from mlsae_core.analyse import figure_title, write_run_figures
            from mlsae_core.analysis.tables import dists_from_layer_table
            from mlsae_core.identity import partition

            dists = dists_from_layer_table(latent_layer_dists)
            point = sw.point(sae_key)
            title = figure_title(partition(model, point.expansion_factor, point.k, dists.layers))
            written = write_run_figures(run, dists, title)
            return None, {"files": [str(p) for p in written], "n_live": int(dists.live.sum())}

        figures = [run.figure("dists_heatmap"), run.figure("layer_mean_hist")]
        m = memo(
            layout, "dists_heatmap", part, [upstream(layout, "evaluation", part)], figures, draw
        )
        md = "\n\n".join(runtime.inline_png(p, p.stem) for p in figures)
        return m.result(heatmap=dg.MetadataValue.md(md))

    @dg.asset(
        name="prompt_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        deps=["mlsae", dg.AssetDep("transformer", partition_mapping=model_dep)],
        io_manager_key="parquet_io_manager",
        kinds={"matplotlib", "pdf", "parquet"},
        code_version=CODE_VERSIONS["prompt_heatmap"],
        automation_condition=eager(),
        pool="mlsae_eval",
        description=(
            "For the sweep's eval.prompt: each latent's activation summed over tokens per "
            "layer, normalised over layers, latents sorted by mean layer: the long-form table "
            "(prompt_heatmap.parquet) and the figure (PNG + PDF, inline) in the run directory."
        ),
    )
    def prompt_heatmap(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import runtime
        from mlsae_pipeline.io import read_table, table_path

        layout, part, sw = storage.layout, context.partition_key, sweep.load()
        model, sae_key = split_config_key(part)
        png = layout.run(model, sae_key).figure("prompt_heatmap")
        path = table_path(layout, "prompt_heatmap", part)
        m = memo(
            layout,
            "prompt_heatmap",
            part,
            [sw.eval.prompt, upstream(layout, "mlsae", part)],
            [png, path],
            lambda: runtime.prompt_heatmap(layout, sw, model, sw.point(sae_key)),
            load=lambda: read_table(path),
        )
        return m.output(heatmap=dg.MetadataValue.md(runtime.inline_png(png, "prompt heatmap")))

    return [mlsae, evaluation, dists_heatmap, prompt_heatmap]


# ----- helpers -------------------------------------------------------------------------------
def _curve_md(run: Any) -> str:
    """The training curve inline, with every tenth row of the history beside it."""
    from mlsae_core.train import read_history
    from mlsae_pipeline import runtime

    hist = read_history(run.directory)
    every = max(1, len(hist) // 10)
    rows = "\n".join(
        f"| {r['step']} | {r['tokens']} | {r['fvu']:.4f} | {r['dead_fraction']:.3f} | "
        f"{r['l0']:.1f} |"
        for r in hist[::every] + hist[-1:]
    )
    table = "| step | tokens | fvu | dead | l0 |\n|---|---|---|---|---|\n" + rows
    return runtime.inline_png(run.figure("training_curve"), "training curve") + "\n\n" + table


def _train_with_torchrun(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    spec: Any,
    run: Any,
    chunks: Path,
    root: Path,
) -> dict[str, Any]:
    """Train across train.nproc_per_node processes: torchrun runs mlsae_pipeline.ddp_train."""
    import json

    from mlsae_core import atomic
    from mlsae_core.config import spec_to_dict

    out = run.directory
    job = out.parent / f".{out.name}.ddp.json"
    atomic.write_json(
        job,
        {
            "spec": spec_to_dict(spec),
            "out_dir": str(out),
            "chunks": str(chunks),
            "root": str(root),
        },
    )
    cmd = [
        *_torchrun(),
        "--standalone",
        "--nproc_per_node",
        str(spec.train.nproc_per_node),
        "-m",
        "mlsae_pipeline.ddp_train",
        "--job",
        str(job),
    ]
    context.log.info("launching %s", " ".join(cmd))
    invocation = client.run(command=cmd, context=context, env={"OMP_NUM_THREADS": "1"})
    reported = invocation.get_materialize_result()
    meta = {k: getattr(v, "value", v) for k, v in (reported.metadata or {}).items()}
    meta["launcher"] = "torchrun via Dagster Pipes"
    return json.loads(json.dumps(meta, default=str))
