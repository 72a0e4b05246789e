"""Splice metrics from logit differences: float32 exact, bfloat16 within a measured bound.

The oracle is the plain float64 path (`SpliceMetrics.update_clean/update_layer` on full
float64 logits). The LM head is given realistic logits (std ~3, so the clean distribution is
peaked) and spliced states from near-perfect (dh ~ 1e-3) to poor (dh ~ 1) reconstructions.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlsae_core.evaluate import evaluate, resolve_delta_dtype
from mlsae_core.metrics import SpliceMetrics, unembedding_gram
from tests.tiny import tiny_transformer

D, V, M = 64, 4096, 96


def _head():
    tt = tiny_transformer("llama", n_layers=1, d=D, vocab=V)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tt.unembed.weight.copy_(3 * torch.randn(V, D, generator=g) / math.sqrt(D))
    return tt


def _metrics(tt, eps: float, dtype: torch.dtype | None):
    """(fast or plain) splice metrics for clean states h and spliced h + eps * noise."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(M, D, generator=g)
    hs = h + eps * torch.randn(M, D, generator=g)
    w = tt.unembed.weight.double()
    clean64 = h.double() @ w.t()
    targets = torch.multinomial(torch.softmax(clean64, -1).float(), 1, generator=g).squeeze(-1)
    zero = torch.log_softmax(torch.zeros(V), -1)
    s = SpliceMetrics(1)
    if dtype is None:
        s.update_clean(clean64, targets)
        s.update_layer(0, clean64, hs.double() @ w.t(), targets, zero)
    else:
        ref = s.update_clean_chunked(tt.logits, h, targets, chunk_rows=32)
        gram = unembedding_gram(tt.unembed.weight)
        fn = lambda dh: tt.logit_difference(dh, dtype)  # noqa: E731
        s.update_layer_chunked(0, ref, fn, hs, targets, zero, gram, chunk_rows=32)
    return {k: v[0] for k, v in s.compute().items()}


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 3e-2, 1.0, 30.0])
def test_float32_delta_equals_float64(eps):
    tt = _head()
    want, got = _metrics(tt, eps, None), _metrics(tt, eps, torch.float32)
    assert want["kl"] > 0
    # KL spans 10 orders of magnitude over these eps (at 30 the overflow-safe form runs)
    assert math.isclose(got["kl"], want["kl"], rel_tol=1e-5), (got["kl"], want["kl"])
    assert math.isclose(got["dce"], want["dce"], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(got["ce_spliced"], want["ce_spliced"], rel_tol=1e-6)
    assert math.isclose(got["logit_mse"], want["logit_mse"], rel_tol=1e-5)


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 3e-2, 1.0, 30.0])
def test_bfloat16_delta_within_bound_of_float64(eps):
    """KL's first-order rounding error cancels (p.delta and log sum p e^delta share delta)."""
    tt = _head()
    want, got = _metrics(tt, eps, None), _metrics(tt, eps, torch.bfloat16)
    # measured: KL within 3e-4 relative at every eps
    assert math.isclose(got["kl"], want["kl"], rel_tol=1e-3), (got["kl"], want["kl"])
    # dCE's per-token error does not cancel, but scales with |dh|, not with the logits
    assert abs(got["dce"] - want["dce"]) <= 1e-3 * abs(want["dce"]) + 1e-5
    assert math.isclose(got["ce_spliced"], want["ce_spliced"], rel_tol=1e-3)
    assert math.isclose(got["logit_mse"], want["logit_mse"], rel_tol=1e-5)  # Gram: exact


def test_logit_difference_is_the_difference_of_logits():
    tt = tiny_transformer("gpt2", n_layers=1, d=32, vocab=101)  # GPT-2: tied LM head
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    want = tt.logits(b).double() - tt.logits(a).double()
    torch.testing.assert_close(tt.logit_difference(b - a), want.float(), rtol=1e-4, atol=1e-5)


def test_evaluate_bfloat16_close_to_float32():
    tt = tiny_transformer("gpt_neox", n_layers=2, d=32, vocab=101)
    from mlsae_core.sae import MLSAE

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 101, (4, 16), generator=g)
    masks = torch.ones_like(tokens, dtype=torch.bool)
    torch.manual_seed(0)
    sae = MLSAE(32, 64, 4)
    kw = dict(batch_size=2, progress=False)
    exact = evaluate(tt, sae, tokens, masks, [0, 1], delta_dtype="float32", **kw).rows
    fast = evaluate(tt, sae, tokens, masks, [0, 1], delta_dtype="bfloat16", **kw).rows
    for e, f in zip(exact, fast, strict=True):
        assert math.isclose(f["kl"], e["kl"], rel_tol=1e-2), (f["kl"], e["kl"])
        assert math.isclose(f["ce_spliced"], e["ce_spliced"], rel_tol=1e-3)
        assert f["fvu"] == e["fvu"] and f["l0"] == e["l0"]  # only the splice GEMM changes


def test_resolve_delta_dtype():
    assert resolve_delta_dtype("float32", "cpu") is torch.float32
    assert resolve_delta_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_delta_dtype(torch.bfloat16, "cpu") is torch.bfloat16
    assert resolve_delta_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        resolve_delta_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        resolve_delta_dtype("bf16", "cpu")  # the settings name dtypes in full, as --help says
