"""A changed sweep extends, never discards, what it can.

The smoke sweep cut to k = 4 (an MLSAE over every layer and its single-layer baseline, which
share one activation cache) is swept, then swept again with `data.max_tokens` doubled: each
finished run continues to exactly the weights of one longer run (a fresh sweep with the larger
budget), without repeating a training step. Then another setting changes (train.lr): that run
starts over, and its materialization says which field changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlsae_pipeline.sweep import SWEEPS_DIR

MODEL = "tiny-llama"
KEYS = ("x2-k4-Lall", "x2-k4-L1")


def _write_sweep(path: Path, **changes: dict) -> Path:
    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw["grid"]["k"] = [4]
    for section, values in changes.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep(sweep: Path, data: Path, instance) -> list[dict]:
    from mlsae_pipeline.commands import run_sweep
    from tests.tiny import write_smoke_inputs

    write_smoke_inputs(data)  # the smoke sweep's tiny model and text (kept on reruns)
    rows = run_sweep(sweep, data, instance=instance, report=lambda s: None)
    assert all(r["success"] for r in rows), [r["stage"] for r in rows if not r["success"]]
    return rows


def _weights(data: Path, key: str) -> dict:
    from safetensors.torch import load_file

    return load_file(data / "saes" / MODEL / key / "model.safetensors")


def _mlsae_metadata(instance, key: str) -> dict:
    import dagster as dg

    from mlsae_pipeline.partitions import config_key

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("mlsae"), asset_partitions=[config_key(MODEL, key)]
        ),
        limit=1,
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.mark.slow
def test_larger_budget_extends_each_run_to_one_longer_run(tmp_path, monkeypatch):
    import dagster as dg
    import torch

    from mlsae_core.chunks import TokenChunks
    from mlsae_core.train import read_history

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    small = {"max_tokens": 1024}
    large = {"max_tokens": 2048}
    data, sweep = tmp_path / "data", tmp_path / "sweep.yaml"
    instance = dg.DagsterInstance.ephemeral()
    _sweep(_write_sweep(sweep, data=small), data, instance)
    corpus = data / "corpus" / MODEL / "train.safetensors"
    before = TokenChunks.load(corpus).tokens
    steps_before = {key: len(read_history(data / "saes" / MODEL / key)) for key in KEYS}

    rows = _sweep(_write_sweep(sweep, data=large), data, instance)
    launched = {r["stage"]: r["launched"] for r in rows}
    assert "has a new code version" in launched[f"config_assets {MODEL}|{KEYS[0]}"]["mlsae"]
    # the larger corpus keeps the earlier chunks as its prefix (what makes the extension exact)
    after = TokenChunks.load(corpus).tokens
    assert len(after) > len(before) and torch.equal(after[: len(before)], before)

    fresh_data = tmp_path / "fresh"
    _sweep(
        _write_sweep(tmp_path / "fresh.yaml", data=large),
        fresh_data,
        dg.DagsterInstance.ephemeral(),
    )
    for key in KEYS:
        meta = _mlsae_metadata(instance, key)
        assert meta["run"] == "extend" and meta["changed"] == ["max_tokens: 1024 -> 2048"]
        extended, fresh = _weights(data, key), _weights(fresh_data, key)
        assert extended.keys() == fresh.keys()
        for name in fresh:
            assert torch.equal(extended[name], fresh[name]), f"{key}: {name} differs"
        steps = [r["step"] for r in read_history(data / "saes" / MODEL / key)]
        assert steps == sorted(set(steps)), f"{key}: a training step was repeated"
        fresh_steps = [r["step"] for r in read_history(fresh_data / "saes" / MODEL / key)]
        assert steps == fresh_steps and len(steps) > steps_before[key]

    # any other change starts the run over, and says which field changed
    rows = _sweep(_write_sweep(sweep, data=large, train={"lr": 0.002}), data, instance)
    assert all(r["launched"] for r in rows if r["job"] == "config_assets")
    for key in KEYS:
        meta = _mlsae_metadata(instance, key)
        assert meta["run"] == "restart" and meta["changed"] == ["train.lr: 0.001 -> 0.002"]
        steps = [r["step"] for r in read_history(data / "saes" / MODEL / key)]
        assert steps == fresh_steps
        retrained, fresh = _weights(data, key), _weights(fresh_data, key)
        assert any(not torch.equal(retrained[n], fresh[n]) for n in fresh)  # trained anew
