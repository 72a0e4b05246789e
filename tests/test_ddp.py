"""One MLSAE trained by 2 CPU ranks: the `mlsae` asset launches torchrun through Dagster Pipes."""

from __future__ import annotations

import os

import pytest


@pytest.mark.slow
def test_mlsae_asset_trains_with_torchrun_via_pipes(tmp_path, monkeypatch):
    import dagster as dg
    import yaml

    from mlsae_core.sae import MLSAE
    from mlsae_pipeline.definitions import build_definitions
    from mlsae_pipeline.partitions import config_key
    from mlsae_pipeline.sweep import SWEEPS_DIR, load_sweep

    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw["grid"].update(k=[4], layers=["all"])
    raw["name"] = "ddp"
    raw["train"].update(nproc_per_node=2)
    raw["data"].update(max_tokens=512)
    sweep_file = tmp_path / "ddp.yaml"
    sweep_file.write_text(yaml.safe_dump(raw))
    sweep = load_sweep(sweep_file)
    data = tmp_path / "data"
    monkeypatch.setenv("MLSAE_DATA_DIR", str(data))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    defs = build_definitions(sweep, data, executor=dg.in_process_executor)
    assets = [*defs.assets, *defs.asset_checks]
    resources = dict(defs.resources)
    instance = dg.DagsterInstance.ephemeral()
    first = dg.materialize(
        assets,
        selection=["transformer", "corpus"],
        partition_key="tiny-llama",
        resources=resources,
        instance=instance,
    )
    assert first.success
    key = config_key("tiny-llama", sweep.points[0].key)
    result = dg.materialize(
        assets, selection=["mlsae"], partition_key=key, resources=resources, instance=instance
    )
    assert result.success
    mats = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in mats[-1].materialization.metadata.items()}
    assert meta["world_size"] == 2  # reported by rank 0 through dagster_pipes
    assert meta["launcher"] == "torchrun via Dagster Pipes"
    assert meta["run"] == "trained"  # a new run (not extended, not restarted)
    ckpt = data / "saes" / "tiny-llama" / sweep.points[0].key
    sae = MLSAE.from_pretrained(ckpt)
    assert sae.metadata["layers"] == [0, 1, 2, 3]
    import torch

    norms = sae.decoder.weight.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the run's token budget is split over the ranks: 512 tokens in 128-token steps x 2 ranks
    assert meta["tokens"] >= 512 and meta["steps"] == 2
    assert os.path.exists(ckpt / "history.parquet")
