"""One write path: the pipeline and the CLI produce the same tables from the same checkpoint.

The smoke sweep (cut to k = 4: one MLSAE over every layer and its single-layer baseline, to
stay under a minute) is materialized through Dagster in a temporary storage root; then
`mlsae analyse` runs on one of its checkpoints into another directory and `mlsae figures`
over its checkpoints, and every table must equal the pipeline's: same schema, same values.
"""

from __future__ import annotations

import math

import pytest

from mlsae_core.layout import PASS_TABLES
from tests.conftest import storage_env
from tests.tiny import write_smoke_inputs

MODEL = "tiny-llama"
MLSAE_KEY, SINGLE_KEY = "x2-k4-Lall", "x2-k4-L1"
# every table of one evaluation pass (the prompt heatmap is a separate asset)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import dagster as dg
    import yaml

    from mlsae_core.layout import StorageLayout
    from mlsae_pipeline.commands import run_sweep
    from mlsae_pipeline.sweep import SWEEPS_DIR, load_sweep

    base = tmp_path_factory.mktemp("one_write_path")
    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw["grid"]["k"] = [4]
    sweep_file = base / "smoke-k4.yaml"
    sweep_file.write_text(yaml.safe_dump(raw))
    data, home = base / "data", base / "dagster_home"
    home.mkdir()
    write_smoke_inputs(data)
    with storage_env(data, home):
        rows = run_sweep(
            sweep_file, data, instance=dg.DagsterInstance.ephemeral(), report=lambda s: None
        )
        assert all(r["success"] for r in rows), rows
        yield {"base": base, "layout": StorageLayout(data), "sweep": load_sweep(sweep_file)}


def _rows(table) -> list[dict]:
    """Rows with NaN made comparable (NaN != NaN)."""

    def fix(v):
        if isinstance(v, float) and math.isnan(v):
            return "NaN"
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return [{k: fix(v) for k, v in r.items()} for r in table.to_pylist()]


def assert_same_table(a, b, name: str) -> None:
    assert a.schema.equals(b.schema, check_metadata=True), f"{name}: {a.schema} != {b.schema}"
    assert _rows(a) == _rows(b), f"{name}: values differ"


def test_analyse_writes_the_pipeline_tables(smoke, tmp_path):
    """`mlsae analyse` with the sweep's EvalConfig on a pipeline checkpoint: same tables."""
    import pyarrow.parquet as pq

    from mlsae_core.cli import main

    run = smoke["layout"].run(MODEL, MLSAE_KEY)
    ev = smoke["sweep"].eval
    out = tmp_path / "analysed"
    flags = ("max_tokens", "splice_max_tokens", "batch_size", "n_examples", "n_context")
    args = [f"--{f}={getattr(ev, f)}" for f in flags]
    args += [f"--delta_dtype={ev.delta_dtype}", f"--device={ev.device}"]
    # the checkpoint records the sweep's model and dataset names (tiny-llama, tiny-text):
    # the core resolves both without the pipeline's help
    assert main(["analyse", "--repo_id", str(run.directory), "--out", str(out), *args]) == 0
    for name in PASS_TABLES:
        assert_same_table(
            pq.read_table(run.table(name)), pq.read_table(out / f"{name}.parquet"), name
        )
    figures = {p.name for p in out.iterdir() if p.suffix in (".png", ".pdf")}
    assert figures == {
        f"{s}{x}" for s in ("dists_heatmap", "layer_mean_hist") for x in (".png", ".pdf")
    }
    assert figures <= {p.name for p in run.directory.iterdir()}


@pytest.mark.parametrize("name", ["mmcs", "dists_layer_std", "test_summary"])
def test_figures_commands_equal_the_summary_assets(smoke, tmp_path, name):
    """`mlsae figures NAME` over the sweep's checkpoints writes the summary asset's table."""
    import pyarrow.parquet as pq

    from mlsae_core.cli import main

    layout = smoke["layout"]
    repos = [str(layout.run(MODEL, key).directory) for key in (MLSAE_KEY, SINGLE_KEY)]
    out = tmp_path / "figures"
    assert main(["figures", name, "--repo_id", *repos, "--out", str(out)]) == 0
    asset = pq.read_table(layout.table(name))
    assert asset.num_rows >= 2
    assert_same_table(asset, pq.read_table(out / f"{name}.parquet"), name)
    if name == "mmcs":  # the MLSAE against its single-layer baseline, too
        assert set(asset.column("reference").to_pylist()) == {"self", "layers=1"}
        header = (out / "mmcs.csv").read_text().splitlines()
        assert header[0] == "model_name,expansion_factor,k,mean,var,std,sem"
        assert len(header) == 1 + 2  # the 'self' rows
