"""Streaming metrics equal a one-shot float64 recomputation, over any batch split."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsae_core.metrics import ReconstructionMetrics, SpliceMetrics, metrics_rows

L, N, D, NLAT, K = 3, 40, 6, 20, 3


SEQ = 8  # the N positions are N / SEQ sequences; position 0 of each is `FIRST`
FIRST = torch.arange(N) % SEQ == 0


def planted(seed=0, sink=1.0):
    """x with position 0 of each sequence scaled by `sink` (SmolLM2's deep layers: ~100x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, D, generator=g) * 2 + torch.arange(D) * 0.5
    x[:, FIRST] *= sink
    r = x + 0.3 * torch.randn(L, N, D, generator=g)
    idx = torch.stack([torch.randperm(NLAT, generator=g)[:K] for _ in range(L * N)]).reshape(
        L, N, K
    )
    vals = torch.rand(L, N, K, generator=g)
    vals[vals < 0.2] = 0.0
    return x, r, vals, idx


def fvu_of(x64, r64):
    """[L] sum ||r - x||^2 / sum ||x - mean over positions||^2, in one float64 pass."""
    var = ((x64 - x64.mean(1, keepdim=True)) ** 2).sum(dim=(1, 2))
    return ((r64 - x64) ** 2).sum(dim=(1, 2)) / var


def reference_first(x, r):
    """fvu_nofirst, fvu_standardized and first_share, computed directly (no streamed sums)."""
    x64, r64 = x.double(), r.double()
    nofirst = fvu_of(x64[:, ~FIRST], r64[:, ~FIRST])
    mu = x64.mean(-1, keepdim=True)
    sd = (((x64 - mu) ** 2).sum(-1, keepdim=True) / (D - 1)).sqrt()  # Bessel, as sae.standardize
    std = fvu_of((x64 - mu) / (sd + 1e-5), (r64 - mu) / (sd + 1e-5))
    dev = ((x64 - x64.mean(1, keepdim=True)) ** 2).sum(-1)  # [L, N] about the all-position mean
    return nofirst, std, dev[:, FIRST].sum(1) / dev.sum(1)


def reference(x, r, vals, idx):
    x64, r64 = x.double(), r.double()
    mse = ((r64 - x64) ** 2).mean(dim=(1, 2))
    fvu = fvu_of(x64, r64)
    l0 = (vals > 1e-3).double().sum(-1).mean(-1)
    l1 = vals.double().sum(-1).mean(-1)
    dense = torch.zeros(L, N, NLAT, dtype=torch.float64).scatter_(-1, idx, vals.double())
    fired = (dense > 1e-3).any(1)  # [L, NLAT]
    return mse, fvu, l0, l1, (~fired).double().mean(-1), float((~fired.any(0)).double().mean())


def accumulate(x, r, vals, idx, cuts):
    m = ReconstructionMetrics(L, NLAT, D)
    bounds = [0, *sorted(set(cuts)), N]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            m.update(x[:, a:b], r[:, a:b], vals[:, a:b], idx[:, a:b], FIRST[a:b])
    return m


def test_reconstruction_metrics_match_float64():
    x, r, vals, idx = planted()
    got = accumulate(x, r, vals, idx, [7, 19, 33]).compute()
    mse, fvu, l0, l1, dead, dead_all = reference(x, r, vals, idx)
    for name, want in (("mse", mse), ("fvu", fvu), ("l0", l0), ("l1", l1), ("dead", dead)):
        torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64), want, msg=name)
    rows = metrics_rows([0, 1, 2], accumulate(x, r, vals, idx, []), None)
    assert [row["layer"] for row in rows] == ["0", "1", "2", "avg"]
    assert math.isclose(rows[-1]["fvu"], float(fvu.mean()), rel_tol=1e-9)
    assert rows[-1]["dead"] == dead_all


def test_first_position_statistics_match_float64():
    """A sink at position 0 (100x the others' norm): raw FVU mostly measures that one vector,
    fvu_nofirst and fvu_standardized do not; each equals its direct float64 computation."""
    x, r, vals, idx = planted(sink=100.0)
    got = accumulate(x, r, vals, idx, [5, 16, 17, 30]).compute()
    nofirst, std, share = reference_first(x, r)
    for name, want in (("fvu_nofirst", nofirst), ("fvu_standardized", std), ("first_share", share)):
        torch.testing.assert_close(
            torch.tensor(got[name], dtype=torch.float64), want, rtol=1e-9, atol=0, msg=name
        )
    assert min(got["first_share"]) > 0.9 and max(got["fvu"]) < 0.001 < 0.01 < min(
        got["fvu_nofirst"]
    )
    # without a sink the first positions hold about their count's share (5 of 40) of the variance
    plain = accumulate(*planted(), []).compute()
    assert all(0.02 < s < 0.4 for s in plain["first_share"])
    # no first positions: fvu_nofirst is fvu and the share is 0
    m = ReconstructionMetrics(L, NLAT, D)
    m.update(x[:, ~FIRST], r[:, ~FIRST], vals[:, ~FIRST], idx[:, ~FIRST])
    none = m.compute()
    assert none["fvu_nofirst"] == none["fvu"] and none["first_share"] == pytest.approx([0.0] * L)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=N), max_size=8), st.integers(0, 5))
def test_streaming_over_any_split_equals_one_shot(cuts, seed):
    x, r, vals, idx = planted(seed, sink=1.0 + 30 * (seed % 2))
    one = accumulate(x, r, vals, idx, []).compute()
    split = accumulate(x, r, vals, idx, cuts).compute()
    for key in one:
        torch.testing.assert_close(
            torch.tensor(split[key]), torch.tensor(one[key]), rtol=1e-10, atol=1e-12
        )


def test_splice_metrics_match_float64():
    g = torch.Generator().manual_seed(0)
    M, V = 30, 11
    clean = torch.randn(M, V, generator=g)
    spliced = [clean + 0.5 * torch.randn(M, V, generator=g) for _ in range(2)]
    zero_lp = torch.log_softmax(torch.randn(V, generator=g), -1)
    targets = torch.randint(0, V, (M,), generator=g)
    s = SpliceMetrics(2)
    for a, b in ((0, 12), (12, 30)):
        s.update_clean(clean[a:b], targets[a:b])
        for i in range(2):
            s.update_layer(i, clean[a:b], spliced[i][a:b], targets[a:b], zero_lp)
    got = s.compute()
    lp_c = torch.log_softmax(clean.double(), -1)
    ce_c = torch.nn.functional.cross_entropy(clean.double(), targets)
    for i in range(2):
        lp_s = torch.log_softmax(spliced[i].double(), -1)
        ce_s = torch.nn.functional.cross_entropy(spliced[i].double(), targets)
        kl = torch.nn.functional.kl_div(lp_s, lp_c, log_target=True, reduction="batchmean")
        ce_z = -zero_lp.double()[targets].mean()
        assert math.isclose(got["dce"][i], float(ce_s - ce_c), rel_tol=1e-9)
        assert math.isclose(got["kl"][i], float(kl), rel_tol=1e-9)
        assert math.isclose(
            got["logit_mse"][i],
            float(((clean.double() - spliced[i].double()) ** 2).mean()),
            rel_tol=1e-9,
        )
        assert math.isclose(got["ce_zero"][i], float(ce_z), rel_tol=1e-9)
        assert math.isclose(
            got["loss_recovered"][i], float((ce_z - ce_s) / (ce_z - ce_c)), rel_tol=1e-9
        )
