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

from mlsae_core import atomic
from mlsae_core.config import to_dict
from mlsae_core.layout import RUN_TABLES
from mlsae_pipeline.assets import CODE_VERSIONS, code_version, eager
from mlsae_pipeline.partitions import SweepPartitions, split_config_key
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.sweep import Sweep

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


def build_config_assets(parts: SweepPartitions, sw: Sweep) -> list[Any]:
    model_dep = parts.to_model
    run_settings = [to_dict(sw.sae), to_dict(sw.data), to_dict(sw.train)]

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
        code_version=code_version("mlsae", *run_settings),
        automation_condition=eager(),
        pool="mlsae_train",
        description=(
            "A trained MLSAE (one TopK SAE over the residual stream of every layer in the "
            "config's layer set; one layer = a single-layer baseline): the run directory "
            "saes/<model>/<sae>/ with model.safetensors + config.json, history.parquet and "
            "training_curve.png. A larger data.max_tokens continues the finished run; any "
            "other settings change starts it over (metadata: changed)."
        ),
    )
    def mlsae(
        context: dg.AssetExecutionContext,
        storage: Storage,
        sweep: SweepResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ):
        """Train the config into its run directory, comparing the settings it records first:
        only a larger budget -> the core extends the finished run; any other change (or a new
        mlsae code version) -> the run starts over.

        The one short-circuit inside a run is the core's own: train_run resumes a directory
        that holds the same settings and returns a finished run untouched. "Materialize all"
        in the UI launches up-to-date partitions too, and a crashed run's retry must resume,
        not retrain (`mlsae sweep` launches only what is missing, unsynced or corrupt).
        """
        from mlsae_pipeline import steps

        layout, sw = storage.layout, sweep.load()
        model, sae_key = split_config_key(context.partition_key)
        run = layout.run(model, sae_key)
        spec = sw.run_spec(sw.point(sae_key), sw.model_name(model), layout.lens_dir(model))
        changes = {**steps.settings_changes(run.directory, spec), **_code_change(context)}
        if problem := steps.damaged([run.weights, run.config], recorded_only=True):
            changes["checkpoint"] = (problem, "retrained")  # the pipeline's own output
        extends = steps.is_extension(changes)
        if changes and not extends:
            context.log.info("settings changed: starting %s over", run.directory)
            shutil.rmtree(run.directory)
        meta = _train(context, pipes_subprocess_client, spec, model, run, layout, sw)
        steps.training_curve(layout, model, sae_key)
        steps.record(run.weights, run.config)
        weights = atomic.read_manifest(run.directory)[run.weights.name]["sha256"]
        return dg.MaterializeResult(
            metadata={
                **meta,
                "run": ("extended" if extends else "restarted") if changes else "trained",
                "changed": [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()],
                "checkpoint": dg.MetadataValue.path(str(run.directory)),
                "training_curve": dg.MetadataValue.md(_curve_md(run)),
            },
            data_version=dg.DataVersion(weights[:16]),  # the weights: a no-op run changes nothing
        )

    eval_settings = {k: v for k, v in to_dict(sw.eval).items() if k not in ("prompt", "device")}
    outs = {
        name: dg.AssetOut(
            group_name="evaluation",
            io_manager_key="parquet_io_manager",
            kinds={"parquet", "pytorch"},
            code_version=code_version("evaluation", eval_settings),
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
        from mlsae_pipeline import checks, steps

        sw = sweep.load()
        model, sae_key = split_config_key(context.partition_key)
        tables, meta = steps.evaluate(storage.layout, sw, model, sw.point(sae_key))
        for name in EVAL_TABLES:
            yield dg.Output(
                tables[name], output_name=name, metadata=steps.plain(meta.get(name, {}))
            )
        outcomes = checks.evaluation_checks(tables, sw.checks, sw.eval.spliced_tokens > 0)
        for asset, results in outcomes.items():
            for outcome in results:
                yield outcome.result(asset)

    @dg.asset(
        name="dists_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        ins={"latent_layer_dists": dg.AssetIn("latent_layer_dists")},
        kinds={"matplotlib", "pdf"},
        code_version=code_version("dists_heatmap"),
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
        from mlsae_pipeline import steps

        sw = sweep.load()
        model, sae_key = split_config_key(context.partition_key)
        pngs, meta = steps.dists_figures(storage.layout, sw, model, sae_key, latent_layer_dists)
        md = "\n\n".join(steps.inline_png(p, p.stem) for p in pngs)
        return dg.MaterializeResult(metadata={**meta, "heatmap": dg.MetadataValue.md(md)})

    @dg.asset(
        name="prompt_heatmap",
        group_name="figures",
        partitions_def=parts.configs,
        deps=["mlsae", dg.AssetDep("transformer", partition_mapping=model_dep)],
        io_manager_key="parquet_io_manager",
        kinds={"matplotlib", "pdf", "parquet"},
        code_version=code_version("prompt_heatmap", sw.eval.prompt),
        automation_condition=eager(),
        pool="mlsae_eval",
        description=(
            "For the sweep's eval.prompt: each latent's activation summed over tokens per "
            "layer, normalised over layers, latents sorted by mean layer: the long-form table "
            "(prompt_heatmap.parquet) and the figure (PNG + PDF, inline) in the run directory."
        ),
    )
    def prompt_heatmap(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
        from mlsae_pipeline import steps

        layout, sw = storage.layout, sweep.load()
        model, sae_key = split_config_key(context.partition_key)
        table, meta = steps.prompt_heatmap(layout, sw, model, sw.point(sae_key))
        png = layout.run(model, sae_key).figure("prompt_heatmap")
        md = dg.MetadataValue.md(steps.inline_png(png, "prompt heatmap"))
        return dg.Output(table, metadata={**meta, "heatmap": md})

    return [mlsae, evaluation, dists_heatmap, prompt_heatmap]


# ----- helpers -------------------------------------------------------------------------------
def _code_change(context: dg.AssetExecutionContext) -> dict[str, tuple[Any, Any]]:
    """{"code_version": (then, now)} when the partition's last materialization (Dagster's
    record of it) was made by another CODE_VERSIONS["mlsae"]: such a run starts over."""
    from dagster._core.definitions.data_version import extract_data_provenance_from_entry

    record = context.instance.get_latest_data_version_record(
        context.asset_key, partition_key=context.partition_key
    )
    provenance = extract_data_provenance_from_entry(record.event_log_entry) if record else None
    then = (provenance.code_version or "").split(".")[0] if provenance else None
    now = CODE_VERSIONS["mlsae"]
    return {"code_version": (then, now)} if then not in (None, now) else {}


def _train(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    spec: Any,
    model: str,
    run: Any,
    layout: Any,
    sw: Sweep,
) -> dict[str, Any]:
    """In this process, or across train.nproc_per_node processes through torchrun."""
    from mlsae_pipeline import steps

    chunks = layout.corpus_path(model, "train")
    if spec.train.nproc_per_node > 1:
        return _train_with_torchrun(context, client, spec, run, chunks, layout.root)
    # several configs of one model share one transformer pass (activation cache)
    shared = layout.cache_dir(model) if len(sw.points) > 1 else None
    return steps.train_sae(
        spec, run.directory, chunks, layout.root, _log_progress(context),
        steps.terminal_progress(), shared,
    )  # fmt: skip


def _curve_md(run: Any) -> str:
    """The training curve inline, with every tenth row of the history beside it."""
    from mlsae_core.train import read_history
    from mlsae_pipeline import steps

    hist = read_history(run.directory)
    every = max(1, len(hist) // 10)
    rows = "\n".join(
        f"| {r['step']} | {r['tokens']} | {r['fvu']:.4f} | {r['dead_fraction']:.3f} | "
        f"{r['l0']:.1f} |"
        for r in hist[::every] + hist[-1:]
    )
    table = "| step | tokens | fvu | dead | l0 |\n|---|---|---|---|---|\n" + rows
    return steps.inline_png(run.figure("training_curve"), "training curve") + "\n\n" + table


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
