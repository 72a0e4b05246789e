"""Groups `training`, `evaluation`, `figures`, `exports`: everything per (model x SAE config)
partition.

`mlsae` trains the checkpoint into its run directory (in-process, or across processes with
torchrun through Dagster Pipes when the sweep sets train.nproc_per_node > 1). `evaluation`
is ONE pass of `mlsae_core.analyse.one_pass`; it materializes every table of
`analyse.analysis_tables` as an asset of the same name, which the IO manager writes into the
run directory under the file names `mlsae analyse` uses, and runs their checks on the
in-memory tables. The figures and the SAELens export land in the run directory too.
"""

import json
import sys
from typing import Any

import dagster as dg

from mlsae_core import atomic
from mlsae_core.config import to_dict
from mlsae_core.identity import run_id
from mlsae_core.layout import PASS_TABLES
from mlsae_core.textable import format_table
from mlsae_pipeline import ui
from mlsae_pipeline.assets import CODE_VERSION_TAG, CODE_VERSIONS, PARQUET, asset, code_version
from mlsae_pipeline.partitions import SweepPartitions, split_config_key
from mlsae_pipeline.resources import Storage, SweepResource
from mlsae_pipeline.sweep import Sweep

# The per-run tables of one evaluation pass.
EVAL_TABLES = PASS_TABLES
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


def mlsae(
    context: dg.AssetExecutionContext,
    storage: Storage,
    sweep: SweepResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    """A trained MLSAE (one TopK SAE over the residual stream of every layer in the config's
    layer set; one layer = a single-layer baseline): the run directory saes/<model>/<sae>/
    with model.safetensors + config.json, history.parquet and training_curve.png. A larger
    data.max_tokens continues the finished run; any other settings change (or a new mlsae
    code version, or a damaged checkpoint) starts it over (metadata: run = new, resume,
    extend, finished or restart; changed = the settings that differ).

    What training does is the core's plan (mlsae_core.runs.prepare): it resumes a directory
    that holds the same settings and leaves a finished run untouched, so "Materialize all" in
    the UI and a crashed run's retry never retrain what is there."""
    from mlsae_core import figures, runs
    from mlsae_core.train import read_history

    layout, sw = storage.layout, sweep.load()
    model, sae_key = split_config_key(context.partition_key)
    run = layout.run(model, sae_key)
    spec = sw.run_spec(sw.point(sae_key), sw.model_name(model), layout.lens_dir(model))
    plan = runs.prepare(spec, run.directory, "restart", _code_change(context))
    if spec.train.nproc_per_node < 2:
        meta = runs.train_stored(
            spec, layout, model, run.directory, len(sw.points) > 1, ui.terminal_progress(),
            _log_progress(context), plan,
        )  # fmt: skip
    else:
        meta = _torchrun(context, pipes_subprocess_client, spec, layout, model, run)
    hist = read_history(run.directory)
    pngs = figures.training_curve_figure(
        hist, run.figure_stem("training_curve"), f"{model} {sae_key}"
    )
    shown = ["step", "tokens", "fvu", "dead_fraction", "l0"]
    rows = [[r[c] for c in shown] for r in hist[:: max(1, len(hist) // 10)] + hist[-1:]]
    curve = ui.figures_md(pngs[:1]) + "\n\n" + format_table(shown, rows, len(rows), markdown=True)
    weights = atomic.read_manifest(run.directory)[run.weights.name]["sha256"]
    return dg.MaterializeResult(
        metadata={
            **meta,
            "run": "restart" if plan.action == "conflict" else plan.action,
            "changed": plan.describe(),
            "files": ui.files(layout, (run.weights, run.config, *pngs)),
            "checkpoint": dg.MetadataValue.path(str(run.directory)),
            "training_curve": ui.md(curve),
        },
        data_version=dg.DataVersion(weights[:16]),  # the weights: a no-op run changes nothing
    )


def evaluation(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """One evaluation pass (analyse.one_pass): test metrics, layer distributions, layer
    variance, max examples; every table of analyse.analysis_tables."""
    from mlsae_core.analyse import analysis_tables, one_pass
    from mlsae_core.evaluate import resolve_delta_dtype
    from mlsae_pipeline import checks

    layout, sw = storage.layout, sweep.load()
    model, sae_key = split_config_key(context.partition_key)
    setup, part = _load_run(layout, sw, model, sae_key)
    test = setup.chunks
    result = one_pass(setup.transformer, setup.sae, test, setup.layers, sw.eval,
                      progress=ui.terminal_progress(), lens=setup.lens)  # fmt: skip
    tables = analysis_tables(result, part, test)
    avg = next(r for r in result.metrics_rows if r["layer"] == "avg")
    dtype = resolve_delta_dtype(sw.eval.delta_dtype, setup.transformer.device)
    splice = {True: "logit difference (linear head)", False: "full logits"}
    meta = {
        "test_metrics": {
            "n_tokens": result.n_tokens,
            "splice_tokens": sw.eval.spliced_tokens,
            "delta_dtype": str(dtype).removeprefix("torch."),
            "splice_path": splice.get(result.linear_head, "none"),
            **{k: avg[k] for k in ("fvu", "l0", "dead", "dce")},
        },
        "latent_dists": {"n_live": int(result.dists.live.sum()), "n_latents": setup.sae.n_latents},
        "max_examples": {"n_examples": len(result.examples)},
    }
    for name in EVAL_TABLES:
        yield dg.Output(tables[name], output_name=name, metadata=ui.plain(meta.get(name, {})))
    outcomes = checks.evaluation_checks(tables, sw.checks, sw.eval.spliced_tokens > 0)
    for asset_name, results in outcomes.items():
        for outcome in results:
            yield outcome.result(asset_name)


def dists_heatmap(
    context: dg.AssetExecutionContext,
    storage: Storage,
    sweep: SweepResource,
    latent_layer_dists: Any,
):
    """Heatmap of p[layer, latent] for live latents sorted by mean layer, plus the histogram
    of latents' mean layers (dists_heatmap / layer_mean_hist .png + .pdf in the run directory,
    as `mlsae analyse` writes them; shown inline)."""
    from mlsae_core.analyse import figure_title, write_run_figures
    from mlsae_core.analysis.tables import dists_from_layer_table

    model, sae_key = split_config_key(context.partition_key)
    point, run = sweep.load().point(sae_key), storage.layout.run(model, sae_key)
    dists = dists_from_layer_table(latent_layer_dists)
    part = run_id(model, point.expansion_factor, point.k, dists.layers, seed=point.seed)
    written = write_run_figures(run, dists, figure_title(part))
    pngs = [p for p in written if p.suffix == ".png"]
    return dg.MaterializeResult(
        metadata={
            "files": ui.files(storage.layout, written),
            "n_live": int(dists.live.sum()),
            "heatmap": ui.md(ui.figures_md(pngs)),
        }  # fmt: skip
    )


def prompt_heatmap(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """For the sweep's eval.prompt: each latent's activation summed over tokens per layer,
    normalised over layers, latents sorted by mean layer: the long-form table
    (prompt_heatmap.parquet) and the figure (PNG + PDF, inline) in the run directory."""
    from mlsae_core import figures
    from mlsae_core.analysis import prompts, tables

    layout, sw = storage.layout, sweep.load()
    model, sae_key = split_config_key(context.partition_key)
    setup, part = _load_run(layout, sw, model, sae_key)
    heat = prompts.prompt_heatmap(
        setup.transformer, setup.sae, setup.layers, prompt=sw.eval.prompt, lens=setup.lens
    )
    run = layout.run(model, sae_key)
    written = figures.prompt_heatmap_figure(heat, run.figure_stem("prompt_heatmap"))
    meta = {"n_latents_active": int(heat.latents.numel()), "tokens": " ".join(heat.tokens),
            "heatmap": ui.md(ui.figures_md([p for p in written if p.suffix == ".png"]))}  # fmt: skip
    return dg.Output(tables.prompt_heatmap_table(heat, part), metadata=meta)


def probes(context: dg.AssetExecutionContext, storage: Storage, sweep: SweepResource):
    """k-sparse probing of the MLSAE's latents (analysis.probing, docs/method.md §9): per layer it
    was trained on and per sae-probes dataset of the sweep's probe: section, a logistic
    regression on the top-k latents (k = 1, 2, 4, ... probe.max_k) of the prompt's last token;
    test AUC, accuracy, F1. The residual ceiling is its model's `residual_probes`."""
    from mlsae_core.analysis import probing

    layout, sw = storage.layout, sweep.load()
    model, sae_key = split_config_key(context.partition_key)
    sets = probing.load_datasets(sw.probe)
    setup, part = _load_run(layout, sw, model, sae_key)
    table = probing.probe(setup.transformer, sets, part, setup.sae, lens=setup.lens,
                          max_k=sw.probe.max_k, residual=False)  # fmt: skip
    return dg.Output(table, metadata={"table": ui.md(ui.table_md(table))})


def saelens_export(context: dg.AssetExecutionContext, storage: Storage):
    """The MLSAE as SAELens TopK SAEs, one per layer (`mlsae export --format saelens`):
    saes/<model>/<sae>/saelens/<hook>/ with the layer distributions as sparsity.safetensors
    (docs/interop.md)."""
    from mlsae_core.interop import saelens
    from mlsae_core.sae import MLSAE

    layout = storage.layout
    run = layout.run(*split_config_key(context.partition_key))
    sae = MLSAE.from_pretrained(run.directory)
    written = saelens.write(sae, run.directory, run.directory / "saelens", layout)
    where = dg.MetadataValue.path(str(run.directory / "saelens"))
    files = ui.files(layout, [p / "sae_weights.safetensors" for p in written])
    return dg.MaterializeResult(
        metadata={"hooks": [p.name for p in written], "directory": where, "files": files}
    )


def build_config_assets(parts: SweepPartitions, sw: Sweep) -> list[Any]:
    """The per-config assets, partitioned (model x SAE config); each reads its model's
    assets through the `model` dimension, and its code version hashes the settings it reads."""
    per_config = {"partitions_def": parts.configs}
    to_model = parts.to_model
    transformer = dg.AssetDep("transformer", partition_mapping=to_model)
    corpus = dg.AssetDep("corpus", partition_mapping=to_model)
    lens = dg.AssetDep("tuned_lens", partition_mapping=to_model)
    run_settings = (to_dict(sw.sae), to_dict(sw.data), to_dict(sw.train))
    return [
        asset(
            "training",
            {"pytorch", "safetensors"},
            run_settings,
            deps=[transformer, corpus, lens],
            pool="mlsae_train",
            **per_config,
        )(mlsae),
        _evaluation_asset(parts, sw, deps=["mlsae", transformer, corpus]),
        asset(
            "figures",
            {"matplotlib", "pdf"},
            ins={"latent_layer_dists": dg.AssetIn("latent_layer_dists")},
            **per_config,
        )(dists_heatmap),
        asset(
            "figures",
            {"matplotlib", "pdf", "parquet"},
            (sw.eval.prompt,),
            deps=["mlsae", transformer],
            io_manager_key=PARQUET,
            pool="mlsae_eval",
            **per_config,
        )(prompt_heatmap),
        *(
            [
                asset(
                    "evaluation",
                    {"parquet", "pytorch"},
                    (to_dict(sw.probe), sw.eval.device),
                    deps=["mlsae", transformer, corpus],
                    io_manager_key=PARQUET,
                    pool="mlsae_eval",
                    **per_config,
                )(probes)
            ]
            if sw.probe is not None
            else []
        ),  # fmt: skip
        asset(
            "exports",
            {"safetensors"},
            deps=["mlsae", "latent_layer_dists", transformer],
            **per_config,
        )(saelens_export),
    ]


def _evaluation_asset(parts: SweepPartitions, sw: Sweep, deps: list[Any]) -> Any:
    """`evaluation` as one multi-asset: an output per table, the per-config checks."""
    eval_settings = {k: v for k, v in to_dict(sw.eval).items() if k not in ("prompt", "device")}
    outs = {
        name: dg.AssetOut(
            group_name="evaluation",
            io_manager_key=PARQUET,
            kinds={"parquet", "pytorch"},
            code_version=code_version("evaluation", eval_settings),
            automation_condition=dg.AutomationCondition.eager(),
            description=EVAL_DESCRIPTIONS[name],
        )
        for name in EVAL_TABLES
    }
    check_specs = [
        dg.AssetCheckSpec(name, asset=table)
        for table, names in EVAL_CHECKS.items()
        for name in names
    ]
    return dg.multi_asset(
        name="evaluation",
        outs=outs,
        partitions_def=parts.configs,
        deps=deps,
        check_specs=check_specs,
        pool="mlsae_eval",
        description=evaluation.__doc__,
    )(evaluation)


# ----- helpers -------------------------------------------------------------------------------
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


def _code_change(context: dg.AssetExecutionContext) -> dict[str, tuple[Any, Any]]:
    """{"code_version": (then, now)} when the partition's last materialization (Dagster's
    record of it) was made by another CODE_VERSIONS["mlsae"]: such a run starts over."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(context.asset_key, asset_partitions=[context.partition_key]), 1
    ).records
    tags = (records[0].asset_materialization.tags or {}) if records else {}
    then = tags.get(CODE_VERSION_TAG, "").split(".")[0] or None
    now = CODE_VERSIONS["mlsae"]
    return {"code_version": (then, now)} if then not in (None, now) else {}


def _load_run(layout: Any, sw: Sweep, model: str, sae_key: str) -> tuple[Any, dict[str, Any]]:
    """(runs.load_for_test on the run, its stored test chunks and model; its run-id columns)."""
    from mlsae_core.chunks import TokenChunks
    from mlsae_core.runs import load_for_test
    from mlsae_core.transformer import Transformer

    point = sw.point(sae_key)
    tr = Transformer.load(sw.model_name(model), sw.eval.device, models_dir=layout.models_dir)
    test = TokenChunks.load(layout.corpus_path(model, "test"))
    setup = load_for_test(
        layout.run(model, sae_key).directory, sw.eval, transformer=tr, chunks=test
    )
    part = run_id(
        model, point.expansion_factor, point.k, setup.layers, point.tuned_lens, point.seed
    )
    return setup, part


def _torchrun(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    spec: Any,
    layout: Any,
    model: str,
    run: Any,
) -> dict[str, Any]:
    """Train across train.nproc_per_node processes: torchrun runs mlsae_pipeline.ddp_train
    through Dagster Pipes."""
    from mlsae_core.config import spec_to_dict

    job = run.directory.parent / f".{run.directory.name}.ddp.json"
    atomic.write_json(job, {"spec": spec_to_dict(spec), "out_dir": str(run.directory),
                            "model": model, "root": str(layout.root)})  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    n = spec.train.nproc_per_node
    cmd = [*torchrun, f"--nproc_per_node={n}", "-m", "mlsae_pipeline.ddp_train", f"--job={job}"]
    context.log.info("launching %s", " ".join(cmd))
    invocation = client.run(command=cmd, context=context, env={"OMP_NUM_THREADS": "1"})
    reported = invocation.get_materialize_result().metadata or {}
    meta = {k: getattr(v, "value", v) for k, v in reported.items()}
    return json.loads(json.dumps({**meta, "launcher": "torchrun via Dagster Pipes"}, default=str))
