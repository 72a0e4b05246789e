"""Subprocess body for the crash tests: train a small MLSAE, or rewrite artefacts in a loop."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mlsae_core.config import SAEConfig, TrainConfig
from mlsae_core.train import train


class Planted:
    def __init__(self, n_rows: int = 32, pos: int = 16, n_layers: int = 3, d: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.n_layers, self.d_model = n_layers, d
        atoms = torch.randn(64, d, generator=g)
        idx = torch.randint(0, 64, (n_layers, n_rows, pos, 3), generator=g)
        coef = torch.rand(n_layers, n_rows, pos, 3, generator=g)
        self.acts = (atoms[idx] * coef[..., None]).sum(-2)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.acts[:, rows]


def run_training(out: Path) -> None:
    torch.set_num_threads(1)
    src = Planted()
    train(
        src,
        torch.ones(32, 16, dtype=torch.bool),
        SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=200),
        TrainConfig(lr=3e-3, accumulate_grad_batches=1, checkpoint_every=3, device="cpu"),
        out,
        batch_size=4,
        max_tokens=4 * 16 * 300,  # 300 steps
        progress=False,
    )


def rewrite_forever(out: Path) -> None:
    """Rewrite a Parquet table and a checkpoint with growing content until killed."""
    import pyarrow as pa

    from mlsae_core import atomic
    from mlsae_core.sae import MLSAE

    i = 0
    while True:
        i += 1
        atomic.write_parquet(out / "t.parquet", pa.table({"v": list(range(i % 50 + 1))}))
        torch.manual_seed(i)
        MLSAE(8, 16 * (1 + i % 3), 2).save_pretrained(out / "ck")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    run_training(out) if mode == "train" else rewrite_forever(out)
