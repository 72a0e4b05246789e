"""The real SmolLM2 (all 30 layers) on Brown-corpus tokens: training works, metrics are finite."""

from __future__ import annotations

import math

import pytest
import torch

from mlsae_core.config import DataConfig, SAEConfig, TrainConfig
from mlsae_core.data import transformer_split
from mlsae_core.evaluate import evaluate
from mlsae_core.train import read_history, train

pytestmark = pytest.mark.integration


class StoredActivations:
    """Activations computed once by the real model, reused for several epochs of steps."""

    def __init__(self, acts: torch.Tensor) -> None:
        self.acts = acts  # [L, rows, pos, d]
        self.n_layers, self.d_model = acts.shape[0], acts.shape[-1]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.acts[:, rows]


@pytest.fixture(scope="module")
def smollm2():
    from mlsae_core.transformer import Transformer

    torch.set_num_threads(2)
    return Transformer.load("smollm2")


def test_smollm2_all_layers_trains_and_evaluates(smollm2, tmp_path):
    data = DataConfig(dataset="brown", max_length=64, max_tokens=2048)
    chunks = transformer_split(smollm2, data, seed=0, which="train", max_tokens=2048)
    assert chunks.tokens.shape == (32, 64)
    acts = torch.cat([smollm2.activations(chunks.tokens[s : s + 8]) for s in range(0, 32, 8)], 1)
    assert acts.shape == (30, 32, 64, 576)
    sae = train(
        StoredActivations(acts),
        chunks.mask(),
        SAEConfig(expansion_factor=2, k=32, dead_tokens_threshold=100_000),
        TrainConfig(lr=2e-3, accumulate_grad_batches=1, checkpoint_every=1000, device="cpu"),
        tmp_path,
        batch_size=8,
        max_tokens=8 * 64 * 40,  # 40 steps over the 2048 tokens (10 epochs)
        metadata={"model_name": "smollm2", "layers": list(range(30))},
        progress=False,
    )
    hist = read_history(tmp_path)
    first, last = hist[0]["fvu"], hist[-1]["fvu"]
    assert last < 0.6 * first, (first, last)

    test = transformer_split(smollm2, data, seed=0, which="test", max_tokens=128)
    result = evaluate(smollm2, sae, test.tokens, test.mask(), list(range(30)), batch_size=2,
                      progress=False)  # fmt: skip
    rows = result.rows
    assert len(rows) == 31 and rows[-1]["layer"] == "avg"
    for r in rows:
        assert math.isfinite(r["dce"]) and math.isfinite(r["kl"]) and r["kl"] >= 0, r
        assert math.isfinite(r["fvu"]) and math.isfinite(r["ce_zero"])
