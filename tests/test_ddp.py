"""One MLSAE trained by 2 CPU ranks: the `mlsae` asset launches torchrun through Dagster Pipes."""

from __future__ import annotations

import os

import pytest

from tests.tiny import write_smoke_inputs


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
    data = write_smoke_inputs(tmp_path / "data")
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
    assert meta["run"] == "new"  # a new run (not extended, not restarted)
    ckpt = data / "saes" / "tiny-llama" / sweep.points[0].key
    sae = MLSAE.from_pretrained(ckpt)
    assert sae.metadata["layers"] == [0, 1, 2, 3]
    import torch

    norms = sae.decoder.weight.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the run's token budget is split over the ranks: 512 tokens in 128-token steps x 2 ranks
    assert meta["tokens"] >= 512 and meta["steps"] == 2
    assert os.path.exists(ckpt / "history.parquet")


def _rank_body(rank: int, out: str, port: int) -> None:
    """One of two gloo ranks: a full run into a/, then one stopped after 5 steps and resumed
    into b/; each rank saves its final weights and dead-latent counters."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from mlsae_core.config import SAEConfig, TrainConfig
    from mlsae_core.train import train
    from tests.test_train import PlantedActivations, masks_for

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    src = PlantedActivations()

    def run(d: str, steps: int | None = None):
        return train(
            src, masks_for(src), SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=40),
            TrainConfig(lr=3e-3, accumulate_grad_batches=1, checkpoint_every=2, device="cpu"),
            Path(out) / d, batch_size=1, max_tokens=2 * 8 * 10, progress=False,
            stop_after_steps=steps,
        )  # fmt: skip

    full = run("a")
    run("b", steps=5)
    resumed = run("b")
    for name, sae in (("full", full), ("resumed", resumed)):
        tensors = {k: v.contiguous() for k, v in sae.state_dict().items()}
        tensors["tokens_since_fired"] = sae.tokens_since_fired.contiguous()
        save_file(tensors, str(Path(out) / f"{name}-rank{rank}.safetensors"))


@pytest.mark.slow
def test_two_ranks_agree_on_dead_latents_and_resume_exactly(tmp_path):
    """The dead-latent counters are all-reduced (every rank counts a latent fired anywhere), so
    the ranks agree and a resume from rank 0's state equals the uninterrupted run."""
    import socket

    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_body, args=(str(tmp_path), port), nprocs=2)
    got = {f.stem: load_file(f) for f in tmp_path.glob("*.safetensors")}
    want = got["full-rank0"]
    for name in ("full-rank1", "resumed-rank0", "resumed-rank1"):
        for key, value in want.items():
            assert torch.equal(value, got[name][key]), (name, key)
