"""The Dagster pipeline end to end on the smoke sweep (tiny random Llama, synthetic text).

One module-scoped materialization of the whole graph (every partition, through Dagster) in a
temporary storage root and DAGSTER_HOME; the other tests read what it produced, re-run it,
query it, break it, or serve it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlsae_core.layout import RUN_TABLES
from tests.conftest import storage_env
from tests.tiny import write_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

ASSET_KEYS = {
    "transformer",
    "corpus",
    "resid_cos_sim",
    "tuned_lens",
    "mlsae",
    "test_metrics",
    "latent_dists",
    "latent_layer_dists",
    "dists_summary",
    "layer_variance",
    "latent_variance",
    "max_examples",
    "dists_heatmap",
    "prompt_heatmap",
    "probes",
    "residual_probes",
    "test_summary",
    "dists_layer_std",
    "mmcs",
    "single_layer_comparison",
    "claims",
    "report",
    "results_db",
    "saelens_export",
}
# Per-run tables live in the run directories (saes/<model>/<sae>/<name>.parquet).
TABLES = (
    *(name for name in RUN_TABLES if name != "probes"),  # the probes view adds the ceiling's
    "resid_cos_sim",
    "test_summary",
    "dists_layer_std",
    "mmcs",
    "single_layer_comparison",
    "claims",
)
PART = ["model", "expansion_factor", "k", "layers", "tuned_lens", "seed"]


def _env(data: Path, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLSAE_SWEEP": "smoke",
        "MLSAE_DATA_DIR": str(data),
        "DAGSTER_HOME": str(home),
        # `dagster asset materialize` (1.13) finds the code location via -m or this variable
        # (the README's shell setup exports it); `dagster dev` reads pyproject/workspace.yaml.
        "DAGSTER_MODULE_NAME": "mlsae_pipeline.definitions",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Materialize every asset of every partition of the smoke sweep once."""
    import dagster as dg

    from mlsae_pipeline.commands import run_sweep

    base = tmp_path_factory.mktemp("pipeline")
    data, home = base / "data", base / "dagster_home"
    home.mkdir()
    write_smoke_inputs(data)
    with storage_env(data, home):
        instance = dg.DagsterInstance.get()
        t0 = time.perf_counter()
        rows = run_sweep("smoke", data, instance=instance, report=lambda s: None)
        yield {
            "data": data,
            "home": home,
            "rows": rows,
            "instance": instance,
            "seconds": time.perf_counter() - t0,
        }


def _table(data: Path, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    single = data / "tables" / f"{name}.parquet"
    if single.exists():
        return pq.read_table(single)
    paths = sorted((data / "saes").glob(f"*/*/{name}.parquet"))
    paths = paths or sorted((data / "tables" / name).glob("*.parquet"))  # per-model tables
    return pa.concat_tables(pq.read_table(p) for p in paths)


# ----- loading ----------------------------------------------------------------------------------
def test_definitions_load_fast_without_torch():
    code = (
        "import sys, time; t = time.perf_counter(); import mlsae_pipeline.definitions as d; "
        "dt = time.perf_counter() - t; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "print(dt, len(d.defs.resolve_asset_graph().get_all_asset_keys()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "MLSAE_SWEEP": "default"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seconds, n = out.stdout.split()
    assert int(n) == len(ASSET_KEYS)
    assert float(seconds) < 15


def test_definitions_assets_groups_kinds_partitions(tmp_path):
    from mlsae_pipeline.definitions import build_definitions

    defs = build_definitions("smoke", tmp_path)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSET_KEYS
    groups = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, f"{key} has no description"
        assert node.kinds, f"{key} has no kinds"
        groups[key.to_user_string()] = node.group_name
    assert groups["transformer"] == "models" and groups["mlsae"] == "training"
    assert groups["test_metrics"] == "evaluation" and groups["mmcs"] == "summary"
    mlsae = graph.get(next(k for k in graph.get_all_asset_keys() if k.path == ["mlsae"]))
    assert sorted(mlsae.partitions_def.get_partition_keys()) == [
        "tiny-llama|x2-k4-L1",
        "tiny-llama|x2-k4-Lall",
        "tiny-llama|x2-k8-L1",
        "tiny-llama|x2-k8-Lall",
    ]
    assert mlsae.pools == {"mlsae_train"}
    assert mlsae.automation_condition is not None and mlsae.code_version
    assert defs.resolve_schedule_def("nightly_summary_refresh")
    assert defs.resolve_sensor_def("mlsae_automation")
    # `mlsae sweep`'s stages come from the definitions' jobs: every partition of each job
    from mlsae_pipeline.commands import sweep_stages

    stages = sweep_stages(defs)
    assert [label for label, _, _ in stages] == [
        "model_assets tiny-llama",
        *(f"config_assets tiny-llama|x2-k{k}-L{layers}" for k in (4, 8) for layers in ("all", "1")),
        "summary_tables",
    ]
    named = [
        {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}
        for _, job, _ in stages
    ]
    assert named[0] == {"transformer", "corpus", "tuned_lens", "resid_cos_sim", "residual_probes"}
    assert named[-1] == {"test_summary", "dists_layer_std", "mmcs", "single_layer_comparison",
                         "claims", "report", "results_db"}  # fmt: skip
    assert set().union(*named) == ASSET_KEYS


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"grid": {"k": [0]}}, "k=0 is not allowed"),
        ({"grid": {"layers": ["some"]}}, "layers entry 'some' is not allowed"),
        ({"grid": {"ks": [4]}}, "unknown key(s) ['ks'] in grid"),
        ({"train": {"lrr": 1}}, "unknown key(s) ['lrr']"),
        ({"eval": {"splice_max_tokens": -1}}, "splice_max_tokens=-1 is not allowed"),
        ({"checks": {"fvu_max": -1}}, "fvu_max"),
        ({"train": {"device": "tpu"}}, "device='tpu' is not allowed"),
        ({"expansion_factors": [2]}, "unknown key(s) ['expansion_factors'] in sweep file"),
        ({"eval": {"tokens": 10}}, "unknown key(s) ['tokens'] in eval of sweep file"),
    ],
)
def test_sweep_validation_messages(tmp_path, patch, message):
    import yaml

    from mlsae_core.config import ConfigError
    from mlsae_pipeline.sweep import SWEEPS_DIR, load_sweep

    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)


def test_shipped_sweeps_are_valid():
    from mlsae_pipeline.sweep import load_sweep

    default = load_sweep("default")
    assert default.model_keys == ["smollm2"] and default.data.dataset == "brown"
    assert any(p.single_layer for p in default.points)
    smoke = load_sweep("smoke")
    assert sum(not p.single_layer for p in smoke.points) >= 2
    assert any(p.single_layer for p in smoke.points)


# ----- the materialized graph -------------------------------------------------------------------
def test_whole_graph_materializes(smoke):
    rows = smoke["rows"]
    assert [r["stage"] for r in rows][0] == "model_assets tiny-llama"
    assert len(rows) == 1 + 4 + 1
    assert all(r["success"] for r in rows), rows
    assert not any(r["failed_checks"] for r in rows), rows
    runs = smoke["instance"].get_runs()
    assert len(runs) >= len(rows)  # recorded in DAGSTER_HOME: visible in the UI
    # the sweep's configs shared one transformer pass: an activation cache of every layer
    from mlsae_core.cache import ActivationCache

    cache = ActivationCache.open(smoke["data"] / "cache" / "tiny-llama")
    assert cache.n_layers == 4
    # every config also left its SAELens export, which loads back as the same MLSAE
    import torch

    from mlsae_core.sae import MLSAE

    run = smoke["data"] / "saes" / "tiny-llama" / "x2-k4-Lall"
    hooks = sorted(p.name for p in (run / "saelens").glob("model.layers.*"))
    assert hooks == [f"model.layers.{i}" for i in range(4)]
    assert (run / "saelens" / hooks[2] / "sparsity.safetensors").is_file()
    back, ours = MLSAE.from_pretrained(run / "saelens" / hooks[2]), MLSAE.from_pretrained(run)
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in ours.state_dict().items())


def test_tables_columns_and_rows(smoke):
    data = smoke["data"]
    t = {name: _table(data, name) for name in TABLES}
    n_all, n_single, n_layers, n_latents = 2, 2, 4, 64
    # test_metrics: per layer + avg
    assert t["test_metrics"].num_rows == n_all * (n_layers + 1) + n_single * 2
    assert t["test_metrics"].column_names[:7] == [*PART, "layer"]
    assert {"fvu", "mse", "l0", "dce", "kl", "loss_recovered"} <= set(
        t["test_metrics"].column_names
    )
    assert t["latent_dists"].num_rows == 4 * n_latents
    assert t["latent_dists"].column_names[:6] == PART
    assert {"layer_mean", "layer_std", "live", "n_layers_active"} <= set(
        t["latent_dists"].column_names
    )
    ex = t["max_examples"]
    assert ex.num_rows > 0 and ex.column_names[:6] == PART
    assert {"latent", "layer", "rank", "activation", "context_tokens"} <= set(ex.column_names)
    assert max(ex.column("rank").to_pylist()) < 4  # n_examples in smoke.yaml
    assert t["latent_layer_dists"].num_rows > 0
    assert t["latent_layer_dists"].column_names[:6] == PART
    for name in ("dists_summary", "layer_variance"):  # one row per config
        assert t[name].num_rows == 4 and t[name].column_names[:6] == PART, name
    assert t["latent_variance"].num_rows == 4 * n_latents
    assert t["prompt_heatmap"].num_rows > 0 and t["prompt_heatmap"].column_names[:6] == PART
    assert t["resid_cos_sim"].num_rows == n_layers
    assert t["resid_cos_sim"].column_names[:2] == ["model", "layer"]
    assert t["test_summary"].num_rows == 4
    assert t["test_summary"].column_names[:7] == [*PART, "n_layers"]
    assert t["dists_layer_std"].num_rows == 4
    assert {"mean", "std", "sem", "mean_rel"} <= set(t["dists_layer_std"].column_names)
    mmcs = t["mmcs"].to_pylist()
    assert len(mmcs) == 4 + 2  # self for every config, MLSAE vs single-layer for the two MLSAEs
    assert {r["reference"] for r in mmcs} == {"self", "layers=1"}
    assert all(-1 <= r["mean"] <= 1 for r in mmcs)
    slc = t["single_layer_comparison"].to_pylist()
    assert len(slc) == 2 and all(r["layer"] == 1 and r["layers"] == "0-3" for r in slc)
    # the comparison is the MLSAE's layer-1 row next to the single-layer SAE's
    tm = t["test_metrics"].to_pylist()
    for r in slc:
        m = next(x for x in tm if x["k"] == r["k"] and x["layers"] == "0-3" and x["layer"] == "1")
        s = next(x for x in tm if x["k"] == r["k"] and x["layers"] == "1" and x["layer"] == "1")
        assert r["mlsae_fvu"] == m["fvu"] and r["single_fvu"] == s["fvu"]
    # the average row's FVU is the mean of the per-layer rows
    for cfg in {(x["k"], x["layers"]) for x in tm}:
        rows = [x for x in tm if (x["k"], x["layers"]) == cfg]
        per_layer = [x["fvu"] for x in rows if x["layer"] != "avg"]
        avg = next(x["fvu"] for x in rows if x["layer"] == "avg")
        assert math.isclose(avg, sum(per_layer) / len(per_layer), rel_tol=1e-9)
    # one set of run-id types everywhere (mlsae_core.identity)
    for name in TABLES:
        if name != "resid_cos_sim":
            types = [str(t[name].schema.field(c).type) for c in PART]
            assert types == ["string", "int32", "int32", "string", "bool", "int32"], name
    # figures sit in the run directory beside the checkpoint and its tables
    run = data / "saes" / "tiny-llama" / "x2-k4-Lall"
    for stem in ("training_curve", "dists_heatmap", "layer_mean_hist", "prompt_heatmap"):
        assert (run / f"{stem}.png").exists() and (run / f"{stem}.pdf").exists(), stem
    assert (data / "saes" / "tiny-llama" / "x2-k8-L1" / "history.parquet").exists()
    assert (data / "figures" / "resid_cos_sim_tiny-llama.png").exists()
    assert not (data / "eval").exists()
    # probes: per config, at its layers, k = 1, 2 on both datasets; the ceiling once per model
    probes, ceiling = _table(data, "probes").to_pylist(), _table(data, "residual_probes")
    assert len(probes) == 2 * 2 * (2 * n_layers + 2 * 1)  # 2 k x 2 sets x (2 MLSAEs + 2 singles)
    assert {(r["source"], r["probe_k"]) for r in probes} == {("sae", 1), ("sae", 2)}
    assert all(0 <= r["test_auc"] <= 1 and r["n_test"] > 0 for r in probes)
    assert ceiling.column_names[:2] == ["model", "layer"] and ceiling.num_rows == 2 * n_layers
    assert set(ceiling.column("source").to_pylist()) == {"residual"}


def test_duckdb_views_and_query(smoke, capsys):
    from mlsae_core.cli import main
    from mlsae_core.query import connect

    db = smoke["data"] / "results.duckdb"
    con = connect(db)  # the views' paths are relative to the storage root
    try:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        assert set(TABLES) <= views
        for name in TABLES:
            n = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            assert n == _table(smoke["data"], name).num_rows, name
        ranked = con.execute("SELECT layers, k, fvu FROM test_summary ORDER BY fvu ASC").fetchall()
        # one probes view: every config's rows and, once per model, the residual ceiling's
        by_source = dict(con.execute("SELECT source, count(*) FROM probes GROUP BY 1").fetchall())
        assert by_source == {"sae": _table(smoke["data"], "probes").num_rows, "residual": 8}
    finally:
        con.close()
    assert len(ranked) == 4 and ranked[0][2] <= ranked[-1][2]
    old = os.environ.get("MLSAE_DATA_DIR")
    os.environ["MLSAE_DATA_DIR"] = str(smoke["data"])
    try:
        rc = main(
            ["query", "SELECT k, layers, round(fvu, 3) AS fvu FROM test_summary ORDER BY fvu"]
        )
    finally:
        if old is not None:
            os.environ["MLSAE_DATA_DIR"] = old
    out = capsys.readouterr().out
    assert rc == 0 and "fvu" in out and "0-3" in out
    assert len(out.strip().splitlines()) == 2 + 4


def test_claims_and_report(smoke, tmp_path, capsys):
    """The smoke sweep's claims (one seed, one expansion factor: cannot tell, with the reason),
    the report asset's UI page (claims table, an inline figure, the HTML's path) and
    `mlsae report` over the storage root, which gives the same claims table."""
    import dagster as dg
    import pyarrow.parquet as pq

    from mlsae_core.cli import main

    data = smoke["data"]
    claims = _table(data, "claims").to_pylist()
    verdicts = {r["claim"]: (r["verdict"], r["reason"]) for r in claims}
    assert verdicts[1][0] == "cannot tell" and "one seed" in verdicts[1][1]
    assert verdicts[3][0] == "cannot tell" and "only one expansion factor" in verdicts[3][1]
    assert {r["statistic"] for r in claims if r["claim"] == 2} == {
        "variance_ratio",
        "orig_variance_ratio",
    }
    event = smoke["instance"].get_latest_materialization_event(dg.AssetKey("report"))
    meta = event.asset_materialization.metadata
    md = meta["report"].value
    assert "| claim | verdict | reason |" in md and "data:image/png;base64," in md
    assert "report.html" in md and Path(meta["html"].value).exists()
    html = (data / "report" / "report.html").read_text()
    assert html.count("<h2>Claim") == 3 and "data:image/png;base64," in html
    assert main(["report", "--data_dir", str(data), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "claim 1: cannot tell" in out and "report.html" in out
    assert pq.read_table(tmp_path / "r" / "claims.parquet").equals(_table(data, "claims"))


def test_second_materialization_recomputes_nothing(smoke):
    from mlsae_pipeline.commands import run_sweep

    data = smoke["data"]
    ckpt = data / "saes" / "tiny-llama" / "x2-k4-Lall" / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    hist_before = (ckpt.parent / "history.parquet").read_bytes()
    rows = run_sweep("smoke", data, instance=smoke["instance"], report=lambda s: None)
    assert all(r["success"] for r in rows)
    assert not any(r["launched"] for r in rows), [r["launched"] for r in rows]
    assert not any(r["run_id"] for r in rows)  # an up-to-date stage launches no run at all
    skipped = set()
    for r in rows:
        skipped.update(r["skipped"])
    heavy = {
        "transformer",
        "corpus",
        "resid_cos_sim",
        "mlsae",
        "test_metrics",
        "latent_dists",
        "latent_layer_dists",
        "dists_summary",
        "layer_variance",
        "latent_variance",
        "max_examples",
        "dists_heatmap",
        "prompt_heatmap",
        "test_summary",
        "dists_layer_std",
        "mmcs",
        "single_layer_comparison",
        "claims",
        "report",
        "results_db",
    }
    assert heavy <= skipped, heavy - skipped
    assert [r["stage"] for r in rows] == [r["stage"] for r in smoke["rows"]]
    assert ckpt.stat().st_mtime_ns == before
    assert (ckpt.parent / "history.parquet").read_bytes() == hist_before


def test_cli_materialize_mmcs(smoke):
    """`dagster asset materialize --select mmcs` from the project root (pyproject's module)."""
    path = smoke["data"] / "tables" / "mmcs.parquet"
    before = path.read_bytes()  # materializing an asset by hand always recomputes it
    out = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "--select", "mmcs"],
        cwd=ROOT,
        env=_env(smoke["data"], smoke["home"]),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RUN_SUCCESS" in out.stderr + out.stdout
    import pyarrow.parquet as pq

    assert pq.read_table(path).equals(pq.read_table(__import__("io").BytesIO(before)))


def test_checks_fail_on_planted_nan(smoke, tmp_path):
    import dagster as dg
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mlsae_pipeline import checks
    from mlsae_pipeline.definitions import build_definitions
    from mlsae_pipeline.sweep import load_sweep

    data = tmp_path / "data"
    for sub in ("tables", "saes"):
        shutil.copytree(smoke["data"] / sub, data / sub)
    # 1. the per-config check logic (run inside the evaluation step)
    part = sorted((data / "saes").glob("*/*/test_metrics.parquet"))[0]
    table = pq.read_table(part)
    assert all(
        o.passed for o in checks.test_metrics_checks(table, load_sweep("smoke").checks, True)
    )
    fvu = table.column("fvu").to_pylist()
    fvu[table.column("layer").to_pylist().index("avg")] = float("nan")
    planted = table.set_column(table.column_names.index("fvu"), "fvu", pa.array(fvu))
    outcome = checks.test_metrics_checks(planted, load_sweep("smoke").checks, True)[0]
    assert outcome.name == "no_nan" and not outcome.passed and "fvu" in outcome.description
    from mlsae_core import atomic

    atomic.write_parquet(part, planted)  # as the pipeline writes it (recorded in its manifest)
    # 2. through Dagster: test_summary picks the NaN up and its no_nan check fails
    defs = build_definitions("smoke", data, executor=dg.in_process_executor)
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=["test_summary"],
        resources=dict(defs.resources),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals.get("no_nan") is False, evals
    summary = pq.read_table(data / "tables" / "test_summary.parquet")
    assert pc.any(pc.is_nan(summary.column("fvu"))).as_py()
    # 3. examples missing for a live latent fail their check
    ex = _table(smoke["data"], "max_examples")
    dists = _table(smoke["data"], "latent_dists")
    key = dists.slice(0, 1).to_pylist()[0]
    one = dists.filter(pc.equal(dists.column("layers"), key["layers"]))
    one = one.filter(pc.equal(one.column("k"), key["k"]))
    ex_one = ex.filter(pc.equal(ex.column("layers"), key["layers"]))
    ex_one = ex_one.filter(pc.equal(ex_one.column("k"), key["k"]))
    assert all(o.passed for o in checks.max_examples_checks(ex_one, one))
    live = one.filter(one.column("live")).column("latent")[0].as_py()
    dropped = ex_one.filter(pc.not_equal(ex_one.column("latent"), live))
    assert not checks.max_examples_checks(dropped, one)[0].passed
    # 4. distributions that do not sum to one fail
    import numpy as np

    sums = np.ones(one.num_rows)
    assert all(o.passed for o in checks.latent_dists_checks(one, sums))
    sums[live] = 0.9
    assert not checks.latent_dists_checks(one, sums)[1].passed


def test_summary_reads_the_partitions_that_exist(smoke, tmp_path):
    """The IO manager (Dagster's UPathIOManager) concatenates the config partitions of a table
    that exist; a missing one is skipped, not an error."""
    import dagster as dg
    import pyarrow.parquet as pq

    from mlsae_pipeline.definitions import build_definitions

    data = tmp_path / "data"
    for sub in ("tables", "saes"):
        shutil.copytree(smoke["data"] / sub, data / sub)
    (data / "saes" / "tiny-llama" / "x2-k8-L1" / "test_metrics.parquet").unlink()
    defs = build_definitions("smoke", data, executor=dg.in_process_executor)
    result = dg.materialize(
        list(defs.assets),
        selection=["test_summary"],
        resources=dict(defs.resources),
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    summary = pq.read_table(data / "tables" / "test_summary.parquet")
    assert summary.num_rows == 3 and ("1", 8) not in set(
        zip(summary.column("layers").to_pylist(), summary.column("k").to_pylist(), strict=True)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_webserver_lists_assets(smoke):
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-p", str(port), "-h", "127.0.0.1"],
        cwd=ROOT,
        env=_env(smoke["data"], smoke["home"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    query = json.dumps(
        {"query": "{ assetNodes { assetKey { path } groupName description kinds } }"}
    ).encode()
    try:
        deadline = time.time() + 120
        body = None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=query,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=10) as resp:
                    body = json.loads(resp.read())
                if body.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert body is not None, "the webserver did not answer within 120 s"
        nodes = body["data"]["assetNodes"]
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} == ASSET_KEYS
        assert all(n["description"] and n["groupName"] for n in nodes)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
