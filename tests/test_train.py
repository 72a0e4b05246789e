"""Training: resume equals an uninterrupted run, FVU falls, divergence stops with a message."""

from __future__ import annotations

import math

import pytest
import torch

from mlsae_core.config import SAEConfig, TrainConfig
from mlsae_core.sae import MLSAE
from mlsae_core.train import TrainingDiverged, read_history, train


class PlantedActivations:
    """Activations that are sparse combinations of a hidden dictionary: learnable, seeded."""

    def __init__(self, n_rows=24, pos=8, n_layers=3, d=16, n_atoms=64, k=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d_model = n_layers, d
        atoms = torch.randn(n_atoms, d, generator=g)
        idx = torch.randint(0, n_atoms, (n_layers, n_rows, pos, k), generator=g)
        coef = torch.rand(n_layers, n_rows, pos, k, generator=g) * 3
        self.acts = (atoms[idx] * coef[..., None]).sum(-2) + 0.01 * torch.randn(
            n_layers, n_rows, pos, d, generator=g
        )  # [L, rows, pos, d]

    def __call__(self, rows):
        return self.acts[:, rows]


def masks_for(src):
    m = torch.ones(src.acts.shape[1], src.acts.shape[2], dtype=torch.bool)
    m[:, 0] = False  # a special token at the start of every chunk
    return m


def run(tmp, src, steps=None, **kw):
    sae_cfg = SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=40)
    train_cfg = TrainConfig(lr=3e-3, accumulate_grad_batches=2, checkpoint_every=2, device="cpu")
    return train(
        src,
        masks_for(src),
        sae_cfg,
        train_cfg,
        tmp,
        batch_size=2,
        max_tokens=2 * 8 * 2 * 12,  # 12 steps
        progress=False,
        stop_after_steps=steps,
        **kw,
    )


def test_resume_equals_uninterrupted(tmp_path):
    src = PlantedActivations()
    full = run(tmp_path / "a", src)
    run(tmp_path / "b", src, steps=5)  # stops after step 5; checkpoint at step 4
    resumed = run(tmp_path / "b", src)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(full.tokens_since_fired, resumed.tokens_since_fired, rtol=0, atol=0)
    hist_a, hist_b = read_history(tmp_path / "a"), read_history(tmp_path / "b")
    assert [r["step"] for r in hist_b] == list(range(12))
    assert [r["loss"] for r in hist_a] == [r["loss"] for r in hist_b]
    # the saved checkpoint is the final model
    loaded = MLSAE.from_pretrained(tmp_path / "a")
    assert torch.equal(loaded.encoder.weight, full.encoder.weight)


def test_fvu_falls_and_history_is_written(tmp_path):
    src = PlantedActivations(n_rows=32, pos=16, seed=1)
    sae_cfg = SAEConfig(expansion_factor=8, k=4, auxk=16, dead_tokens_threshold=10_000)
    train_cfg = TrainConfig(lr=1e-2, accumulate_grad_batches=1, checkpoint_every=50, device="cpu")
    train(
        src,
        masks_for(src),
        sae_cfg,
        train_cfg,
        tmp_path,
        batch_size=4,
        max_tokens=4 * 16 * 60,
        progress=False,
    )
    hist = read_history(tmp_path)
    assert len(hist) == 60
    first, last = hist[0]["fvu"], sum(r["fvu"] for r in hist[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert all(abs(r["l0"] - 4) < 1e-6 or r["l0"] <= 4 for r in hist)


def test_nan_stops_training_and_keeps_checkpoint(tmp_path):
    src = PlantedActivations()
    run(tmp_path, src, steps=2)  # checkpoint at step 2
    src.acts[:, :, 3] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step \d+: the model's activations are NaN"):
        run(tmp_path, src)
    assert (tmp_path / "training_state" / "state.json").exists()


def test_changed_settings_refuse_to_resume(tmp_path):
    src = PlantedActivations()
    run(tmp_path, src, steps=2)
    with pytest.raises(ValueError, match=r"other settings \(.*sae.expansion_factor: 4 -> 2"):
        train(
            src,
            masks_for(src),
            SAEConfig(expansion_factor=2, k=4),
            TrainConfig(device="cpu", checkpoint_every=2, accumulate_grad_batches=2, lr=3e-3),
            tmp_path,
            batch_size=2,
            max_tokens=384,
            progress=False,
        )
