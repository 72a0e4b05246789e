"""Every optimised path against the plain one (float64 where exactness matters)."""

from __future__ import annotations

import math

import torch

from mlsae_core.evaluate import evaluate, prediction_mask
from mlsae_core.losses import total_loss
from mlsae_core.metrics import SpliceMetrics
from mlsae_core.sae import MLSAE
from mlsae_core.sparse import sparse_outer_sum
from mlsae_core.train import make_optimizer, optimizer_step
from tests.tiny import tiny_transformer


def test_sparse_outer_sum_equals_dense_float64():
    g = torch.Generator().manual_seed(0)
    N, k, d, n = 50, 4, 7, 30
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    coefs = torch.randn(N, k, generator=g, dtype=torch.float64)
    rows = torch.randn(N, d, generator=g, dtype=torch.float64)
    dense = torch.zeros(N, n, dtype=torch.float64).scatter_(1, idx, coefs)
    want = dense.t() @ rows  # [n, d]
    torch.testing.assert_close(sparse_outer_sum(idx, coefs, rows, n), want)


def _steps(fused: bool) -> MLSAE:
    torch.manual_seed(0)
    sae = MLSAE(8, 32, 3, auxk=None).double()
    opt = make_optimizer(sae, 1e-2, 1e-8)
    if not fused:
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=1e-8)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
        loss, _, _ = total_loss(x, sae(x), 1 / 32)
        loss.backward()
        optimizer_step(sae, opt)
    return sae


def test_fused_adam_equals_plain_adam_float64():
    a, b = _steps(fused=True), _steps(fused=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_evaluate_fast_splice_metrics_equal_plain_float64():
    tt = tiny_transformer("gpt_neox", n_layers=3, d=32)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 101, (5, 12), generator=g)
    tokens[1, 4] = 2  # an EOS: excluded positions
    masks = (tokens != 2) & (tokens != 1) & (tokens != 0)
    torch.manual_seed(0)
    sae = MLSAE(32, 96, 4)
    layers = [0, 1, 2]
    res = evaluate(
        tt, sae, tokens, masks, layers, batch_size=2, progress=False, delta_dtype="float32"
    )
    # plain path: full float64 logits through SpliceMetrics.update_clean/update_layer
    plain = SpliceMetrics(len(layers))
    for start in range(0, 5, 2):
        toks, mask = tokens[start : start + 2], masks[start : start + 2]
        clean = tt.clean_pass(toks, with_logits=False)
        pred = prediction_mask(mask)
        targets = toks[:, 1:][pred[:, :-1]]
        clean_logits = tt.logits(tt.final_norm(clean.hidden[-1])[pred]).double()
        plain.update_clean(clean_logits, targets)
        x = clean.hidden[layers][:, mask]
        recons = sae(x).recons
        for i, layer in enumerate(layers):
            rep = clean.hidden[layer].clone()
            rep[mask] = recons[i]
            spliced = tt.logits(tt.run_from(clean, layer, rep)[pred]).double()
            zero = tt.zero_ablation_log_probs(clean, layer)
            plain.update_layer(i, clean_logits, spliced, targets, zero)
    want = plain.compute()
    got = res.splice.compute()
    for key in ("dce", "kl", "logit_mse", "ce_spliced", "ce_zero", "loss_recovered"):
        for a, b in zip(got[key], want[key], strict=True):
            # loss_recovered is a ratio of small differences: absolute tolerance for it
            tol = 1e-5 if key == "loss_recovered" else 1e-7
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=tol), (key, a, b)
    assert math.isclose(got["ce_clean"][0], want["ce_clean"][0], rel_tol=1e-6)
