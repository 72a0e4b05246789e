"""Streaming metrics equal a one-shot float64 recomputation, over any batch split."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsae_core.metrics import ReconstructionMetrics, SpliceMetrics, metrics_rows

L, N, D, NLAT, K = 3, 40, 6, 20, 3


def planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, D, generator=g) * 2 + torch.arange(D) * 0.5
    r = x + 0.3 * torch.randn(L, N, D, generator=g)
    idx = torch.stack([torch.randperm(NLAT, generator=g)[:K] for _ in range(L * N)]).reshape(
        L, N, K
    )
    vals = torch.rand(L, N, K, generator=g)
    vals[vals < 0.2] = 0.0
    return x, r, vals, idx


def reference(x, r, vals, idx):
    x64, r64 = x.double(), r.double()
    mse = ((r64 - x64) ** 2).mean(dim=(1, 2))
    fvu = ((r64 - x64) ** 2).sum(dim=(1, 2)) / ((x64 - x64.mean(1, keepdim=True)) ** 2).sum(
        dim=(1, 2)
    )
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
            m.update(x[:, a:b], r[:, a:b], vals[:, a:b], idx[:, a:b])
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


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=N), max_size=8), st.integers(0, 5))
def test_streaming_over_any_split_equals_one_shot(cuts, seed):
    x, r, vals, idx = planted(seed)
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
