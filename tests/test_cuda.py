"""CUDA paths against the CPU ones. Skipped without a GPU (CI has none): they are what
`scripts/gpu_check.sh` runs on a lent GPU machine, with the Triton kernels compiled there.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlsae_core.config import SAEConfig, TrainConfig
from mlsae_core.evaluate import evaluate
from mlsae_core.losses import total_loss
from mlsae_core.sae import MLSAE
from tests.test_train import PlantedActivations, masks_for
from tests.tiny import tiny_transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sae_forward_backward_cuda_equals_cpu():
    torch.manual_seed(0)
    cpu = MLSAE(32, 256, 8, auxk=32)
    gpu = MLSAE(32, 256, 8, auxk=32)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(3, 64, 32)
    grads = []
    for sae, xx in ((cpu, x), (gpu, x.cuda())):
        out = sae(xx)
        loss, _, _ = total_loss(xx, out, 1 / 32)
        loss.backward()
        grads.append([loss.detach().cpu()] + [p.grad.cpu() for p in sae.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("delta_dtype", ["float32", "auto"])
def test_evaluate_cuda_matches_cpu(delta_dtype):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 101, (4, 16), generator=g)
    masks = torch.ones_like(tokens, dtype=torch.bool)
    rows = []
    for device in ("cpu", "cuda"):
        tt = tiny_transformer("llama", n_layers=2, d=32, vocab=101)
        tt.model.to(device)
        tt.device = torch.device(device)
        torch.manual_seed(0)
        sae = MLSAE(32, 64, 4).to(device)
        dt = "float32" if device == "cpu" else delta_dtype
        kw = dict(batch_size=2, progress=False, delta_dtype=dt)
        rows.append(evaluate(tt, sae, tokens, masks, [0, 1], **kw).rows)
    rel = 1e-3 if delta_dtype == "float32" else 2e-2  # TF32/bf16 on the GPU
    for c, gpu in zip(*rows, strict=True):
        for key in ("fvu", "kl", "ce_spliced", "logit_mse"):
            assert math.isclose(gpu[key], c[key], rel_tol=rel, abs_tol=1e-6), (key, gpu, c)


def test_training_on_cuda_resumes_bit_identically(tmp_path):
    from mlsae_core.train import train

    src = PlantedActivations()
    sae_cfg = SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=40)
    cfg = TrainConfig(lr=3e-3, accumulate_grad_batches=2, checkpoint_every=2, device="cuda")
    kw = dict(batch_size=2, max_tokens=2 * 8 * 2 * 12, progress=False)
    full = train(src, masks_for(src), sae_cfg, cfg, tmp_path / "a", **kw)
    train(src, masks_for(src), sae_cfg, cfg, tmp_path / "b", stop_after_steps=5, **kw)
    resumed = train(src, masks_for(src), sae_cfg, cfg, tmp_path / "b", **kw)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # deterministic kernels: no atomics in the sparse grads
