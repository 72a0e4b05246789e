"""The pipeline's automation, ticked with Dagster's testing utilities (no daemon, no UI).

A narrowed smoke sweep (the smoke sweep file with one SAE config: k=4 over every layer) is
materialized once through `run_sweep` into an ephemeral instance. Then:

- the automation condition sensor `mlsae_automation` (the eager conditions of every asset it
  targets, evaluated with `dg.evaluate_automation_conditions`, cursor carried from tick to tick
  as the daemon does) requests nothing for an unchanged sweep, not even after `mlsae sweep` is
  run again;
- adding a config to the sweep file (another k) requests exactly the new config's partition of
  every per-config asset, nothing for the existing config and nothing else; once that is materialized, the
  next tick requests the cross-config tables (they read every config), and then nothing;
- adding a model to the sweep requests its per-model assets (transformer, corpus, ...), and
  nothing else yet (its configs follow once those exist, as above);
- the nightly schedule `nightly_summary_refresh` yields one run request for the
  `summary_tables` job, and that run succeeds on the swept storage.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from tests.tiny import write_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "data" / "sweeps" / "smoke.yaml"


def _write_sweep(path: Path, k: list[int], models: list[str] | None = None) -> None:
    """The smoke sweep with one layer set (all layers) and the given k (and models)."""
    doc = yaml.safe_load(SMOKE.read_text())
    grid = doc["grid"] if "grid" in doc else doc  # the grid keys: under `grid:` or top level
    grid["k"] = k
    grid["layers"] = ["all"]
    if models is not None:
        doc["models"] = models
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _kinds(defs) -> dict[str, set[str]]:
    """Asset names by partitioning: per config (model x sae), per model, and unpartitioned."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    kinds: dict[str, set[str]] = {"config": set(), "model": set(), "none": set()}
    for key in graph.get_all_asset_keys():
        pd = graph.get(key).partitions_def
        kind = (
            "none"
            if pd is None
            else "config"
            if isinstance(pd, dg.MultiPartitionsDefinition)
            else "model"
        )
        kinds[kind].add(key.to_user_string())
    return kinds


def _defs(project):
    import dagster as dg

    from mlsae_pipeline.definitions import build_definitions

    return build_definitions(project["sweep"], project["data"], executor=dg.in_process_executor)


def _config_keys(sweep_path: Path) -> set[str]:
    from mlsae_pipeline.partitions import config_key
    from mlsae_pipeline.sweep import load_sweep

    sw = load_sweep(sweep_path)
    return {config_key(m, p.key) for m in sw.model_keys for p in sw.points}


def _tick(defs, instance, cursor=None):
    """One evaluation of the sensor's selection; returns (result, {asset: requested keys})."""
    import dagster as dg

    sensor = defs.resolve_sensor_def("mlsae_automation")
    result = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=sensor.asset_selection, cursor=cursor
    )
    requested = {}
    for key in defs.resolve_all_asset_keys():
        parts = result.get_requested_partitions(key)
        if parts:
            requested[key.to_user_string()] = {str(p) if p is not None else None for p in parts}
    return result, requested


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    import dagster as dg

    from mlsae_pipeline.commands import run_sweep

    base = tmp_path_factory.mktemp("automation")
    sweep, data = base / "sweep.yaml", base / "data"
    _write_sweep(sweep, k=[4])
    write_smoke_inputs(data, ("tiny-llama", "tiny-llama-L2"))  # L2: the model added later
    instance = dg.DagsterInstance.ephemeral()
    with pytest.MonkeyPatch.context() as mp:  # the sources are named under this storage root
        mp.setenv("MLSAE_DATA_DIR", str(data))
        rows = run_sweep(sweep, data, instance=instance, report=lambda s: None)
        assert all(r["success"] for r in rows), rows
        yield {"sweep": sweep, "data": data, "instance": instance}


def test_sensor_targets_every_asset_and_every_asset_is_eager(project) -> None:
    import dagster as dg

    defs = _defs(project)
    sensor = defs.resolve_sensor_def("mlsae_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    # Off until turned on in the UI (the sweep CLI does not need it).
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    graph = defs.resolve_asset_graph()
    everything = set(graph.get_all_asset_keys())
    assert sensor.asset_selection.resolve(graph) == everything
    # A root asset without a condition would never be requested for a new model, and all
    # below it would wait on it as a missing dependency.
    lacking = sorted(
        k.to_user_string() for k in everything if graph.get(k).automation_condition is None
    )
    assert not lacking, f"assets without an automation condition: {lacking}"


def test_unchanged_sweep_requests_nothing(project) -> None:
    from mlsae_pipeline.commands import run_sweep

    defs, instance = _defs(project), project["instance"]
    first, requested = _tick(defs, instance)  # the sensor's first tick, after the sweep
    assert requested == {}, requested
    second, requested = _tick(defs, instance, first.cursor)
    assert requested == {}, requested
    # `mlsae sweep` again while the sensor is on: it launches nothing (every stage is up to
    # date in Dagster's record), so nothing looks like new upstream data to the conditions.
    rows = run_sweep(project["sweep"], project["data"], instance=instance, report=lambda s: None)
    assert all(r["success"] for r in rows), rows
    _, requested = _tick(defs, instance, second.cursor)
    assert requested == {}, requested


def _materialize(defs, instance, selection, partition_key=None) -> None:
    import dagster as dg

    result = dg.materialize(
        [*defs.assets, *(defs.asset_checks or [])],
        selection=sorted(selection),
        partition_key=partition_key,
        instance=instance,
        resources=dict(defs.resources),
    )
    assert result.success


def test_new_config_requests_exactly_its_partitions(project) -> None:
    instance = project["instance"]
    old_keys = _config_keys(project["sweep"])
    result, requested = _tick(_defs(project), instance)
    assert requested == {}

    # A user adds k=8 to the sweep file and reloads the code location.
    _write_sweep(project["sweep"], k=[4, 8])
    new_keys = _config_keys(project["sweep"]) - old_keys
    assert new_keys == {"tiny-llama|x2-k8-Lall"}
    defs = _defs(project)
    kinds = _kinds(defs)
    result, requested = _tick(defs, instance, result.cursor)
    assert requested == {name: new_keys for name in kinds["config"]}, requested

    # Requested once: not again on the next tick (the sensor's run would be in flight).
    result, again = _tick(defs, instance, result.cursor)
    assert again == {}, again

    # The sensor's run: what was requested, for the new partition only.
    (key,) = new_keys
    _materialize(defs, instance, requested, partition_key=key)
    # The cross-config assets read every config: now they follow, and nothing per config.
    result, requested = _tick(defs, instance, result.cursor)
    assert requested == {name: {None} for name in kinds["none"]}, requested
    _materialize(defs, instance, requested)
    _, requested = _tick(defs, instance, result.cursor)
    assert requested == {}, requested


def test_new_model_requests_its_model_assets(project) -> None:
    instance = project["instance"]
    doc = yaml.safe_load(project["sweep"].read_text())
    grid = doc["grid"] if "grid" in doc else doc
    result, requested = _tick(_defs(project), instance)
    assert requested == {}
    try:
        _write_sweep(project["sweep"], k=grid["k"], models=[*doc["models"], "tiny-llama-L2"])
        defs = _defs(project)
        _, requested = _tick(defs, instance, result.cursor)
    finally:
        project["sweep"].write_text(yaml.safe_dump(doc, sort_keys=False))
    # Its configs wait for its transformer and corpus (other partitions, so another run).
    assert requested == {name: {"tiny-llama-L2"} for name in _kinds(defs)["model"]}, requested


def test_nightly_schedule_requests_the_summary_job(project) -> None:
    import dagster as dg

    defs, instance = _defs(project), project["instance"]
    schedule = defs.resolve_schedule_def("nightly_summary_refresh")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.job_name == "summary_tables"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("summary_tables")
    summary = _kinds(defs)["none"]  # the cross-config tables, figures and results_db
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == summary

    tick_time = dt.datetime(2026, 12, 2, 3, 0, tzinfo=dt.UTC)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick_time)
    data = schedule.evaluate_tick(context)
    assert data.skip_message is None
    (request,) = data.run_requests
    assert request.job_name in (None, "summary_tables")  # None: the schedule's own job
    assert request.tags["dagster/schedule_name"] == "nightly_summary_refresh"

    # The run the daemon would launch for this request succeeds and refreshes every table.
    result = job.execute_in_process(
        instance=instance, run_config=request.run_config, tags=request.tags
    )
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == summary
