"""Analyses (docs/method.md §5) against hand computations and float64 brute force."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mlsae_core import identity
from mlsae_core.analysis import probing, summaries, tables
from mlsae_core.analysis.dists import LayerDists, RunningStats, describe
from mlsae_core.analysis.examples import MaxExamples, sae_row_encoder, token_strings
from mlsae_core.analysis.geometry import (
    decoder_sim_vs_layer_distance,
    max_cos,
    mmcs,
    resid_cos_sim,
    transformer_batches,
)
from mlsae_core.analysis.prompts import PromptHeatmap, prompt_heatmap
from mlsae_core.analysis.variance import TokenLayerVariance
from mlsae_core.config import DEFAULT_PROMPT
from mlsae_core.sae import MLSAE, TopK
from tests.tiny import dense_latents

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tables.md"
RUN_ID = {
    "model": "tiny",
    "expansion_factor": 2,
    "k": 2,
    "layers": "2,3,5",
    "tuned_lens": False,
    "seed": 0,
}


# ----- planted data ----------------------------------------------------------------------------
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """[L=3, N=2, k=2] top-k over 4 latents.

    latent 0: only layer index 1 (value 2 on both tokens); latent 1: layers 0 and 2 equally
    (token 0); latent 2: layer 0 (1, token 0) and layer 1 (3, token 1); latent 3: never above
    the threshold (dead).
    """
    entries = {  # (layer, token): [(latent, value), (latent, value)]
        (0, 0): [(1, 1.0), (2, 1.0)],
        (0, 1): [(0, 0.0), (3, 0.0)],
        (1, 0): [(0, 2.0), (3, 0.0005)],
        (1, 1): [(0, 2.0), (2, 3.0)],
        (2, 0): [(1, 1.0), (3, 0.0)],
        (2, 1): [(3, 0.0), (2, 0.0)],
    }
    values = torch.zeros(3, 2, 2)
    indices = torch.zeros(3, 2, 2, dtype=torch.long)
    for (layer, tok), pairs in entries.items():
        for s, (lat, val) in enumerate(pairs):
            values[layer, tok, s] = val
            indices[layer, tok, s] = lat
    return values, indices


def random_topk(
    n_layers: int, n_tok: int, n_latents: int, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ReLU'd top-k (distinct indices per row, some zeros) and its dense float64 form."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_layers, n_tok, n_latents, generator=g)
    v, i = torch.topk(z, k, dim=-1)
    v = torch.relu(v - 0.8)  # some selected values are exactly 0 (not fired)
    dense = torch.zeros(n_layers, n_tok, n_latents, dtype=torch.float64)
    dense.scatter_(-1, i, v.double())
    return v, i, dense


# ----- dists -----------------------------------------------------------------------------------
def test_dists_planted_exact() -> None:
    values, indices = planted()
    col = LayerDists(4, [2, 3, 5])
    col.add(values, indices)
    res = col.result()
    assert res.counts.tolist() == [[0, 1, 1, 0], [2, 0, 1, 0], [0, 1, 0, 0]]
    assert res.totals.tolist() == [[0, 1, 1, 0], [4, 0, 3, 0], [0, 1, 0, 0]]
    assert res.live.tolist() == [True, True, True, False]
    torch.testing.assert_close(res.p[:, 0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(res.p[:, 1], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(res.p[:, 2], torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    assert torch.isnan(res.p[:, 3]).all() and math.isnan(res.layer_mean[3])
    torch.testing.assert_close(res.layer_mean[:3], torch.tensor([1.0, 1.0, 0.75]).double())
    torch.testing.assert_close(res.layer_var[:3], torch.tensor([0.0, 1.0, 0.1875]).double())
    torch.testing.assert_close(res.layer_std[:3], torch.tensor([0.0, 1.0, 0.1875**0.5]).double())
    assert res.n_layers_active.tolist() == [1, 2, 2, 0]
    assert res.count.tolist() == [2, 2, 2, 0] and res.total.tolist() == [4, 2, 4, 0]
    assert res.order().tolist() == [2, 0, 1]  # by layer_mean, ties by id

    s = res.summary()
    std = np.array([0.0, 1.0, 0.1875**0.5])
    assert s["n_live"] == 3 and s["n_layers"] == 3 and s["n_tokens"] == 2
    assert s["mean"] == pytest.approx(std.mean())
    assert s["var"] == pytest.approx(std.var(ddof=1))
    assert s["std"] == pytest.approx(std.std(ddof=1))
    assert s["sem"] == pytest.approx(std.std(ddof=1) / math.sqrt(3))
    assert s["mean_rel"] == pytest.approx(std.mean() / 3)
    assert s["var_rel"] == pytest.approx((std / 3).var(ddof=1))
    assert s["sem_rel"] == pytest.approx(s["sem"] / 3)
    counts, edges = res.histogram(bins=4)
    assert counts.tolist() == [0, 1, 2, 0] and edges[0] == 0 and edges[-1] == 2


def test_layer_dists_parquet_round_trip_is_exact(tmp_path: Path) -> None:
    """The one persisted form of the dists (analyse and pipeline) reads back exactly."""
    import pyarrow.parquet as pq

    from mlsae_core import atomic

    values, indices = planted()
    col = LayerDists(4, [2, 3, 5])
    col.add(values, indices)
    res = col.result()  # latent 3 never fires: absent from the rows, kept by the metadata
    path = tmp_path / "latent_layer_dists.parquet"
    atomic.write_parquet(path, tables.latent_layer_dists_table(res, RUN_ID))
    back = tables.dists_from_layer_table(pq.read_table(path))
    assert back.layers == [2, 3, 5] and back.n_tokens == res.n_tokens
    assert torch.equal(back.counts, res.counts) and torch.equal(back.totals, res.totals)
    assert back.live.tolist() == [True, True, True, False]
    bare = pq.read_table(path).replace_schema_metadata(None)
    with pytest.raises(ValueError, match="mlsae dists"):
        tables.dists_from_layer_table(bare)


def test_dists_random_matches_dense_and_streams() -> None:
    v, i, dense = random_topk(4, 50, 30, 5, seed=1)
    whole = LayerDists(30, range(4))
    whole.add(v, i)
    parts = LayerDists(30, range(4))
    for s in range(0, 50, 7):
        parts.add(v[:, s : s + 7], i[:, s : s + 7])
    fired = dense > 1e-3
    counts = fired.sum(1).double()  # [L, n]
    totals = torch.where(fired, dense, 0.0).sum(1)
    r1, r2 = whole.result(), parts.result()
    torch.testing.assert_close(r1.counts, counts)
    torch.testing.assert_close(r1.totals, totals)
    torch.testing.assert_close(r2.totals, totals)
    torch.testing.assert_close(r1.layer_std, r2.layer_std, equal_nan=True)
    live = totals.sum(0) > 0
    p = totals[:, live] / totals[:, live].sum(0)
    ell = torch.arange(4.0, dtype=torch.float64)[:, None]
    mean = (ell * p).sum(0)
    var = ((ell - mean) ** 2 * p).sum(0)  # the centred form, a different formula
    torch.testing.assert_close(r1.layer_mean[live], mean)
    torch.testing.assert_close(r1.layer_var[live], var)


def test_running_stats_and_describe_match_numpy() -> None:
    x = torch.randn(3, 101, dtype=torch.float64) * 5 + 100
    rs = RunningStats((3,))
    for s in range(0, 101, 13):
        rs.update(x[:, s : s + 13], dim=1)
    out = rs.result()
    np.testing.assert_allclose(out["mean"], x.numpy().mean(1), rtol=1e-12)
    np.testing.assert_allclose(out["var"], x.numpy().var(1, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(out["sem"], x.numpy().std(1, ddof=1) / math.sqrt(101), rtol=1e-10)
    d = describe(x[0])
    assert d["var"] == pytest.approx(x[0].numpy().var(ddof=1)) and d["n"] == 101


# ----- token vs aggregate variance ---------------------------------------------------------
def test_token_variance_planted() -> None:
    # latent 0: layer 0 on token 0, layer 2 on token 1 -> token var 0, aggregate var 1.
    # latent 1: layers 0 and 2 equally on token 0 -> token var 1 = aggregate var 1.
    values = torch.tensor(
        [[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]
    )
    indices = torch.tensor([[[0, 1], [2, 3]], [[2, 3], [2, 3]], [[2, 1], [0, 3]]])
    col = TokenLayerVariance(4, [0, 1, 2])
    col.add(values, indices)
    res = col.result()
    assert res.token_var[:2].tolist() == [0.0, 1.0]
    assert res.aggregate_var[:2].tolist() == [1.0, 1.0]
    assert res.pairs[:2].tolist() == [2, 1]
    assert torch.isnan(res.token_var[2:]).all()
    s = res.summary()
    assert s["n_live"] == 2
    assert s["token_var_mean"] == pytest.approx(0.5)
    assert s["aggregate_var_mean"] == pytest.approx(1.0)
    assert s["ratio"] == pytest.approx(2.0)
    assert s["token_var_weighted"] == pytest.approx((0 * 2 + 1 * 2) / 4)
    assert s["mean_layers_per_token"] == pytest.approx((1 + 1 + 2) / 3)


def test_token_variance_random_matches_dense() -> None:
    v, i, dense = random_topk(5, 40, 20, 6, seed=2)
    col = TokenLayerVariance(20, range(5))
    for s in range(0, 40, 9):
        col.add(v[:, s : s + 9], i[:, s : s + 9])
    res = col.result()
    a = torch.where(dense > 1e-3, dense, 0.0)  # [L, N, n]
    ell = torch.arange(5.0, dtype=torch.float64)[:, None, None]
    w = a.sum(0)  # [N, n]
    m = (ell * a).sum(0) / w.clamp_min(1e-300)
    var_t = ((ell - m) ** 2 * a).sum(0) / w.clamp_min(1e-300)
    tok = (w * var_t).sum(0) / w.sum(0)
    dists = LayerDists(20, range(5))
    dists.add(v, i)
    live = w.sum(0) > 0
    torch.testing.assert_close(res.token_var[live], tok[live])
    torch.testing.assert_close(res.aggregate_var[live], dists.result().layer_var[live])
    # law of total variance: aggregate >= expected token-level variance
    assert (res.aggregate_var[live] >= res.token_var[live] - 1e-12).all()


# ----- max-activating examples -------------------------------------------------------------
R, P, NLAT, KTOP = 3, 7, 5, 2


def example_data() -> tuple[torch.Tensor, torch.Tensor, TopK, torch.Tensor]:
    """tokens [R, P], mask [R, P], topk [L=2, R, P, k] and dense latents [2, R, P, n] (masked)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 39, (R, P), generator=g)
    mask = torch.ones(R, P, dtype=torch.bool)
    mask[1, 0] = False  # a special position: never an example, activation 0 in context
    z = torch.rand(2, R, P, NLAT, generator=g)
    z[0, 0, 0, 0] = 10.0  # the top example of (layer 0, latent 0): first position of a row
    z[1, 2, P - 1, 1] = 10.0  # the top example of (layer 1, latent 1): last position
    z[:, 1, 0, :] = 20.0  # would dominate everything, but the position is masked
    v, i = torch.topk(z, KTOP, dim=-1)
    v = torch.where(mask[None, :, :, None], v, 0.0)
    dense = torch.zeros(2, R, P, NLAT).scatter_(-1, i, v)
    return tokens, mask, TopK(v, i), dense


def feed(col: MaxExamples, topk: TopK, mask: torch.Tensor, rows_per_batch: int) -> None:
    for s in range(0, R, rows_per_batch):
        rows = torch.arange(s, min(R, s + rows_per_batch))
        m = mask[rows]
        b_idx, p_idx = m.nonzero(as_tuple=True)
        col.add(topk.values[:, rows][:, m], topk.indices[:, rows][:, m], rows[b_idx], p_idx, P)


def test_max_examples_planted_and_edges() -> None:
    tokens, mask, topk, dense = example_data()
    col = MaxExamples(NLAT, [4, 6], n_examples=3, n_context=2)
    feed(col, topk, mask, rows_per_batch=R)
    encode = lambda rows: TopK(topk.values[:, rows], topk.indices[:, rows])  # noqa: E731
    res = col.result(tokens, None, encode_rows=encode, batch_size=2)
    examples = tables.max_examples_table(res, RUN_ID).to_pylist()

    seen = set()
    for ex in examples:
        li = [4, 6].index(ex["layer"])
        lat, row, pos = ex["latent"], ex["row"], ex["pos"]
        seen.add((li, lat))
        # the expected top-3 of the dense column, ties impossible (random floats)
        col_vals = dense[li, :, :, lat].flatten()
        order = torch.argsort(col_vals, descending=True)
        want = order[ex["rank"]]
        assert (row, pos) == (int(want) // P, int(want) % P)
        assert ex["activation"] == pytest.approx(float(col_vals[want]))
        assert mask[row, pos]
        lo, hi = max(0, pos - 2), min(P, pos + 3)
        assert ex["context_ids"] == tokens[row, lo:hi].tolist()
        assert ex["centre"] == pos - lo
        assert ex["context_activations"] == pytest.approx(dense[li, row, lo:hi, lat].tolist())
    top00 = examples[0]
    assert (top00["layer"], top00["latent"], top00["rank"], top00["row"], top00["pos"]) == (
        4,
        0,
        0,
        0,
        0,
    )
    assert top00["centre"] == 0 and len(top00["context_ids"]) == 3  # clipped at the start
    last = [e for e in examples if (e["layer"], e["latent"], e["rank"]) == (6, 1, 0)][0]
    assert (last["row"], last["pos"]) == (2, P - 1)
    assert last["centre"] == 2 and len(last["context_ids"]) == 3  # clipped at the end
    # every (layer, latent) that fired anywhere has min(3, #fired) examples
    for li in range(2):
        for lat in range(NLAT):
            n_fired = int((dense[li, :, :, lat] > 1e-3).sum())
            got = int(((res.layer_index == li) & (res.latent == lat)).sum())
            assert got == min(3, n_fired)


def test_max_examples_streaming_equals_one_batch_fixed_memory() -> None:
    tokens, mask, topk, _ = example_data()
    one = MaxExamples(NLAT, [4, 6], n_examples=3, n_context=2)
    feed(one, topk, mask, rows_per_batch=R)
    many = MaxExamples(NLAT, [4, 6], n_examples=3, n_context=2)
    feed(many, topk, mask, rows_per_batch=1)
    assert torch.equal(one.values, many.values) and torch.equal(one.locs, many.locs)

    # many batches of new rows: the state never grows, and equals one pass over them all
    big = MaxExamples(NLAT, [4, 6], n_examples=3, n_context=2)
    stream = MaxExamples(NLAT, [4, 6], n_examples=3, n_context=2)
    shape = tuple(stream.values.shape)
    all_v, all_i, all_r, all_p = [], [], [], []
    for b in range(20):
        v, i, _ = random_topk(2, 8, NLAT, KTOP, seed=100 + b)
        v = torch.round(v.float() * 8) / 8  # coarse values: many ties, broken by location
        rows = torch.full((8,), b)
        pos = torch.arange(8)
        stream.add(v, i, rows, pos, 8)
        assert tuple(stream.values.shape) == shape
        all_v.append(v)
        all_i.append(i)
        all_r.append(rows)
        all_p.append(pos)
    big.add(torch.cat(all_v, 1), torch.cat(all_i, 1), torch.cat(all_r), torch.cat(all_p), 8)
    assert torch.equal(big.values, stream.values) and torch.equal(big.locs, stream.locs)


def test_token_strings_byte_level_markers() -> None:
    class ByteLevel:
        vocab = {0: "Ġthe", 1: "Ċ", 2: "cat"}

        def convert_ids_to_tokens(self, i: int) -> str:
            return self.vocab[i]

        def convert_tokens_to_string(self, toks: list[str]) -> str:
            return "".join(toks).replace("Ġ", " ").replace("Ċ", "\n")

    assert token_strings(ByteLevel(), [2, 0, 1, 0]) == {0: " the", 1: "\n", 2: "cat"}


# ----- geometry ----------------------------------------------------------------------------
def brute_max_cos(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    ua = a / np.linalg.norm(a, axis=0)
    ub = ua if b is None else b / np.linalg.norm(b, axis=0)
    sims = ua.T @ ub
    if b is None:
        np.fill_diagonal(sims, -np.inf)
    return sims.max(1)


def test_mmcs_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 50, generator=g, dtype=torch.float64)
    w[:, 7] = w[:, 3] * 2.0  # a duplicate direction: both have max cosine 1
    want = brute_max_cos(w.numpy(), None)
    for chunk in (7, 1000):
        got = max_cos(w, chunk_size=chunk, dtype=torch.float64)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert got[3] == pytest.approx(1.0) and got[7] == pytest.approx(1.0)
    f32 = max_cos(w.float(), chunk_size=16)
    np.testing.assert_allclose(f32.numpy(), want, atol=1e-5)
    s = mmcs(w, chunk_size=5, dtype=torch.float64)
    assert s["mean"] == pytest.approx(want.mean()) and s["var"] == pytest.approx(want.var(ddof=1))
    assert s["sem"] == pytest.approx(want.std(ddof=1) / math.sqrt(50))

    b = torch.randn(8, 20, generator=g, dtype=torch.float64)
    want_ab = brute_max_cos(w.numpy(), b.numpy())
    got_ab = max_cos(w, b, chunk_size=9, dtype=torch.float64)
    np.testing.assert_allclose(got_ab.numpy(), want_ab, atol=1e-12)
    # a dictionary against itself as "another" dictionary: every column finds itself
    assert torch.allclose(max_cos(w, w.clone(), dtype=torch.float64), torch.ones(50).double())


def test_resid_cos_sim_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [
        torch.randn(4, n, 6, generator=g) * 3 + torch.arange(6.0) for n in (11, 1, 20)
    ]  # [L, N, d]
    res = resid_cos_sim(batches, layers=[0, 1, 2, 3])
    x = torch.cat(batches, 1).double().numpy()  # [L, N, d]
    xc = x - x.mean(1, keepdims=True)
    num = (xc[:-1] * xc[1:]).sum(-1)
    cos = num / (np.linalg.norm(xc[:-1], axis=-1) * np.linalg.norm(xc[1:], axis=-1))  # [L-1, N]
    norms = np.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(res.cos["mean"], cos.mean(1), rtol=1e-10)
    np.testing.assert_allclose(res.cos["var"], cos.var(1, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(res.cos["sem"], cos.std(1, ddof=1) / math.sqrt(32), rtol=1e-9)
    np.testing.assert_allclose(res.norm["mean"], norms.mean(1), rtol=1e-10)
    np.testing.assert_allclose(res.norm["std"], norms.std(1, ddof=1), rtol=1e-9)
    assert res.n_tokens == 32
    with pytest.raises(TypeError):
        resid_cos_sim(iter(batches))  # one-shot iterators cannot give two passes


def test_decoder_sim_vs_layer_distance() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(6, 12, generator=g)
    lm = torch.rand(12, generator=g) * 4
    lm[3] = math.nan  # dead latent: excluded
    full = decoder_sim_vs_layer_distance(w, lm, n_layers=5, dist_bins=4, cos_bins=5)
    assert not full.sampled and full.counts.sum() == 11 * 10 // 2
    # brute force over all pairs of live latents
    live = [i for i in range(12) if i != 3]
    u = (w / w.norm(dim=0)).double()
    cos = [float(u[:, a] @ u[:, b]) for ai, a in enumerate(live) for b in live[ai + 1 :]]
    dist = [abs(float(lm[a] - lm[b])) for ai, a in enumerate(live) for b in live[ai + 1 :]]
    want, _, _ = np.histogram2d(dist, cos, bins=[4, 5], range=[[0, 4], [-1, 1]])
    np.testing.assert_array_equal(full.counts, want)
    sampled = decoder_sim_vs_layer_distance(w, lm, n_layers=5, max_pairs=20, seed=1)
    again = decoder_sim_vs_layer_distance(w, lm, n_layers=5, max_pairs=20, seed=1)
    assert sampled.sampled and sampled.counts.sum() == 20
    np.testing.assert_array_equal(sampled.counts, again.counts)  # seeded


# ----- the one-pass evaluation on a tiny transformer ----------------------------------------
def nan_equal(a: list[dict], b: list[dict]) -> bool:
    def norm(rows: list[dict]) -> list[dict]:
        return [
            {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in rows
        ]

    return norm(a) == norm(b)


@pytest.fixture(scope="module")
def tiny_setup():
    from tests.tiny import BOS_ID, EOS_ID, tiny_transformer

    tt = tiny_transformer("llama", n_layers=3, d=32)
    torch.manual_seed(0)
    sae = MLSAE(32, 48, k=4, auxk=None)
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(4, 39, (5, 12), generator=g)
    tokens[:, 0] = BOS_ID
    tokens[2, 6] = EOS_ID
    mask = ~torch.isin(tokens, torch.tensor([0, BOS_ID, EOS_ID]))
    return tt, sae, tokens, mask


def test_one_pass_equals_separate_passes_and_brute_force(tiny_setup) -> None:
    from mlsae_core.evaluate import evaluate

    tt, sae, tokens, mask = tiny_setup
    layers = [0, 1, 2]
    kw = {"layers": layers, "batch_size": 2, "progress": False, "splice": False}
    dists, ex, var = (
        LayerDists(48, layers),
        MaxExamples(48, layers, n_examples=4, n_context=3),
        TokenLayerVariance(48, layers),
    )
    together = evaluate(tt, sae, tokens, mask, collectors=[dists, ex, var], **kw)
    alone = evaluate(tt, sae, tokens, mask, **kw)
    assert nan_equal(together.rows, alone.rows)
    dists2, ex2 = LayerDists(48, layers), MaxExamples(48, layers, n_examples=4, n_context=3)
    evaluate(tt, sae, tokens, mask, collectors=[dists2], **kw)
    evaluate(tt, sae, tokens, mask, collectors=[ex2], **kw)
    assert torch.equal(dists.counts, dists2.counts) and torch.equal(dists.totals, dists2.totals)
    assert torch.equal(ex.values, ex2.values) and torch.equal(ex.locs, ex2.locs)

    # brute force: dense latents of every counted position, float64 sums
    with torch.no_grad():
        acts = tt.activations(tokens, layers).float()  # [L, R, P, d]
        dense = dense_latents(sae(acts).topk, sae.n_latents).double()  # [L, R, P, n]
    dense = dense * mask[None, :, :, None]
    fired = dense > sae.dead_threshold
    torch.testing.assert_close(dists.counts, fired.sum((1, 2)).double())
    torch.testing.assert_close(dists.totals, torch.where(fired, dense, 0.0).sum((1, 2)))
    assert dists.n_tokens == int(mask.sum())

    encode = sae_row_encoder(tt, sae, tokens, layers, masks=mask)
    res = ex.result(tokens, tt.tokenizer, encode_rows=encode, batch_size=2)
    assert len(res) > 0
    n_tok = tokens.shape[1]
    run_id = {"model": "tiny", "expansion_factor": 1, "k": 4, "layers": identity.layers_label(layers),
            "tuned_lens": False, "seed": 0}  # fmt: skip
    t = tables.max_examples_table(res, run_id)
    rows = t.to_pylist()
    for e in rows:
        li = layers.index(e["layer"])
        column = dense[li, :, :, e["latent"]].flatten()
        assert e["activation"] == pytest.approx(
            float(column.sort(descending=True).values[e["rank"]]), rel=1e-5
        )
        lo, hi = max(0, e["pos"] - 3), min(n_tok, e["pos"] + 4)
        assert e["context_ids"] == tokens[e["row"], lo:hi].tolist()
        want = dense[li, e["row"], lo:hi, e["latent"]].tolist()
        assert e["context_activations"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert e["context_tokens"] == [tt.tokenizer.decode([t]) for t in e["context_ids"]]
    assert {e["pos"] for e in rows} & {0, 1, 2, n_tok - 1}

    # tables: run-id values on every row
    assert t.num_rows == len(res)
    assert set(t.column("layers").to_pylist()) == {"0-2"}
    vt = tables.layer_variance_table(var.result(), run_id)
    assert vt.num_rows == 1 and vt.column("ratio").to_pylist()[0] >= 1.0 - 1e-9


def test_resid_cos_sim_on_transformer_source(tiny_setup) -> None:
    tt, _, tokens, mask = tiny_setup
    source = transformer_batches(tt, tokens, mask, batch_size=2)
    res = resid_cos_sim(source)
    x = torch.cat(list(source()), 1).double()  # [L, N, d]
    xc = x - x.mean(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(xc[:-1], xc[1:], dim=-1)
    torch.testing.assert_close(res.cos["mean"], cos.mean(1))
    assert res.n_tokens == int(mask.sum()) and len(res.layers) == tt.n_layers


def test_prompt_heatmap(tiny_setup) -> None:
    tt, sae, _, _ = tiny_setup
    heat = prompt_heatmap(tt, sae, [0, 1, 2], DEFAULT_PROMPT)
    ids = tt.tokenizer(DEFAULT_PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        acts = tt.activations(torch.tensor([ids]), [0, 1, 2])[:, 0].float()
        dense = (
            dense_latents(sae(acts).topk, sae.n_latents).double().sum(1)
        )  # [L, n] summed over tokens
    alive = (dense.max(0).values >= 1e-3).nonzero().squeeze(-1)
    assert sorted(heat.latents.tolist()) == alive.tolist()
    torch.testing.assert_close(heat.raw, dense[:, heat.latents])
    torch.testing.assert_close(heat.matrix.sum(0), torch.ones(len(alive), dtype=torch.float64))
    assert (heat.layer_mean[1:] >= heat.layer_mean[:-1]).all()
    assert heat.tokens[:2] == ["When", "Mary"]
    assert heat.matrix.shape == (3, len(alive))


def claim1_metrics(mlsae: dict[str, float], seeds: list[dict[str, float]]) -> pa.Table:
    """test_metrics of an MLSAE over layers 0-2 and a single-layer SAE at layer 1 per entry of
    `seeds` (x2, k 8): the given values at layer 1, 0.5 for every other metric."""
    run = {"model": "m", "expansion_factor": 2, "k": 8, "tuned_lens": False}
    rest = dict.fromkeys(summaries.COMPARE_METRICS, 0.5)
    rows = [{**run, "seed": 0, "layers": "0-2", "layer": layer, **rest,
             **(mlsae if layer == "1" else {})} for layer in ("0", "1", "2", "avg")]  # fmt: skip
    rows += [{**run, "seed": i, "layers": "1", "layer": layer, **rest, **values}
             for i, values in enumerate(seeds) for layer in ("1", "avg")]  # fmt: skip
    return pa.Table.from_pylist(rows)


# Layer 1 where the first position holds 98.6% of the variance: the MLSAE's raw FVU is 0.05
# against baselines 0.020 and 0.021 (mean 0.0205, s 0.000707, 2 s sqrt(1.5) = 0.00173), worse
# than max(1.25 x 0.0205, 0.0205 + 0.01) = 0.0305 by 0.0195: raw FVU alone would refute.
# Without the first position (shown): 0.70 against 0.66 and 0.68. Judged: standardized 0.40
# against 0.38, 0.39 (mean 0.385, s 0.00707: 0.40 <= 1.25 x 0.385 - 2 s sqrt(1.5) = 0.464);
# not recovered 1 - 0.85 = 0.15 against 0.16, 0.15 (mean 0.155: 0.15 <= 0.1938 - 0.0173).
SINK_MLSAE = {"fvu": 0.05, "first_share": 0.986, "fvu_nofirst": 0.70,
              "fvu_standardized": 0.40, "loss_recovered": 0.85}  # fmt: skip
SINK_SEEDS = [{"fvu": 0.020, "first_share": 0.986, "fvu_nofirst": 0.66,
               "fvu_standardized": 0.38, "loss_recovered": 0.84},
              {"fvu": 0.021, "first_share": 0.986, "fvu_nofirst": 0.68,
               "fvu_standardized": 0.39, "loss_recovered": 0.85}]  # fmt: skip


@pytest.mark.parametrize(
    ("mlsae", "seeds", "verdict", "decided"),
    [
        # raw FVU worse only through the first position: the judged statistics all hold
        (SINK_MLSAE, SINK_SEEDS, "holds", "all 1 pairs about as well by fvu_standardized "
         "(layer(s) 1), loss_recovered (layer(s) 1);"),
        # genuinely worse downstream (the layer 24): 1 - 0.70 = 0.30 against 0.17, 0.16
        # (mean 0.165, s 0.00707): 0.30 - max(0.206, 0.175) = 0.094 > 2 s sqrt(1.5) = 0.0173
        ({**SINK_MLSAE, "loss_recovered": 0.70},
         [{**s, "loss_recovered": lr} for s, lr in zip(SINK_SEEDS, (0.83, 0.84), strict=True)],
         "does not hold", "1 of 1 (config, layer) pairs clearly worse by loss_recovered "
         "(layer(s) 1);"),
        # within noise: fvu_standardized 0.40 against 0.28, 0.36 (mean 0.32, s 0.0566): the
        # gap 0.40 - max(0.40, 0.33) = 0 is inside 2 s sqrt(1.5) = 0.139 either way
        (SINK_MLSAE,
         [{**s, "fvu_standardized": v} for s, v in zip(SINK_SEEDS, (0.28, 0.36), strict=True)],
         "cannot tell", "1 of 1 (config, layer) pairs within the noise by fvu_standardized "
         "(layer(s) 1);"),
        # the absolute tolerance: 0.004 is 1.95x the baselines' 0.0020, 0.0021 (mean 0.00205),
        # yet within 0.01 of it: 0.004 <= 0.01205 - 0.000173
        ({**SINK_MLSAE, "fvu_standardized": 0.004},
         [{**s, "fvu_standardized": v} for s, v in zip(SINK_SEEDS, (0.0020, 0.0021),
                                                        strict=True)],
         "holds", "fvu_standardized 1.95,"),
        # fvu_nofirst 3x worse (a sink repeated at position 1 can dominate it): shown, not judged
        ({**SINK_MLSAE, "fvu_nofirst": 2.01}, SINK_SEEDS, "holds", "fvu_nofirst 3"),
    ],
)  # fmt: skip
def test_claim1_judged_without_the_first_position(mlsae, seeds, verdict, decided) -> None:
    """Claim 1 by hand: judged by fvu_standardized and 1 - loss_recovered, each within 1.25x
    or 0.01 of the baselines' mean beyond 2 seed spreads; raw FVU and fvu_nofirst shown."""
    from mlsae_core.analysis import claims

    names = summaries.SINGLE_LAYER_COMPARISON_SCHEMA.names  # fvu_std would clash: fvu's spread
    assert len(set(names)) == len(names)
    rows, (got, reason) = claims.claim1(claim1_metrics(mlsae, seeds))
    assert got == verdict, reason
    assert decided in reason, reason
    assert "raw FVU 2.44 (each sequence's first position holds 0.986 of its variance)" in reason
    by_stat = {r["statistic"]: r for r in rows}
    assert set(by_stat) == set(claims.CLAIM1_METRICS)  # the raw-FVU row stays in the table
    for m, r in by_stat.items():
        assert r["layer"] == 1 and r["n_seeds"] == 2
        assert r["value"] == pytest.approx(mlsae.get(m, 0.5))
        assert r["baseline"] == pytest.approx(np.mean([s.get(m, 0.5) for s in seeds]))
        assert r["baseline_spread"] == pytest.approx(np.std([s.get(m, 0.5) for s in seeds], ddof=1))


def test_claim1_reads_tables_that_predate_the_first_position_metrics() -> None:
    """A stored test_metrics without fvu_nofirst, fvu_standardized, first_share: those rows are
    null and only loss recovered is judged."""
    from mlsae_core.analysis import claims

    old = claim1_metrics(SINK_MLSAE, SINK_SEEDS).drop(
        ["fvu_nofirst", "fvu_standardized", "first_share"]
    )
    rows, (got, reason) = claims.claim1(old)
    assert got == claims.HOLDS and "about as well by loss_recovered (layer(s) 1);" in reason
    assert next(r for r in rows if r["statistic"] == "fvu_nofirst")["value"] is None


# ----- tables ----------------------------------------------------------------------------------
def documented_columns() -> dict[str, list[str]]:
    """Table name -> column names from docs/tables.md (`## name` then a | column | ... | table)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in DOCS.read_text().splitlines():
        head = re.match(r"^## `?([a-z_]+)`?", line)
        if head:
            current = head.group(1)
            out[current] = []
            continue
        keyed = re.match(r"^Keyed by: (.*)$", line)
        if current and keyed:
            out[current] = re.findall(r"`([a-z_]+)`", keyed.group(1)) + out[current]
            continue
        cell = re.match(r"^\| `([a-z_0-9]+)` \|", line)
        if current and cell:
            out[current].append(cell.group(1))
    return out


def test_tables_have_documented_columns(tmp_path: Path) -> None:
    values, indices = planted()
    d = LayerDists(4, [2, 3, 5])
    d.add(values, indices)
    dres = d.result()
    v = TokenLayerVariance(4, [2, 3, 5])
    v.add(values, indices)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 4, generator=g)
    tokens, mask, topk, _ = example_data()
    ex = MaxExamples(NLAT, [4, 6], n_examples=2, n_context=1)
    feed(ex, topk, mask, rows_per_batch=2)
    eres = ex.result(tokens)
    rcs = resid_cos_sim([torch.randn(3, 10, 4)])
    model_part = {"model": "tiny"}
    heat = PromptHeatmap(
        prompt="a b",
        layers=[2, 3, 5],
        tokens=["a", "b"],
        latents=torch.tensor([2, 0]),
        matrix=dres.p[:, [2, 0]],
        layer_mean=dres.layer_mean[[2, 0]],
        raw=dres.totals[:, [2, 0]],
    )
    built = {
        "latent_dists": tables.latent_dists_table(dres, RUN_ID),
        "latent_layer_dists": tables.latent_layer_dists_table(dres, RUN_ID),
        "dists_summary": tables.dists_summary_table(dres, RUN_ID),
        "layer_variance": tables.layer_variance_table(v.result(), RUN_ID),
        "latent_variance": tables.latent_variance_table(v.result(), RUN_ID),
        "max_examples": tables.max_examples_table(eres, RUN_ID),
        "resid_cos_sim": tables.resid_cos_sim_table(rcs, model_part),
        "mmcs": tables.mmcs_table(mmcs(w), RUN_ID),
        "prompt_heatmap": tables.prompt_heatmap_table(heat, RUN_ID),
        "probes": probing.probes_table(RUN_ID, [
            {"layer": 2, "dataset": "5_hist_fig_ismale", "probe_k": 1, "source": "sae",
             "test_auc": 0.75, "test_acc": 0.7, "test_f1": 0.6, "n_train": 8, "n_test": 4}
        ]),
    }  # fmt: skip
    docs = documented_columns()
    for name, table in built.items():
        assert name in docs, f"{name} is not documented in docs/tables.md"
        assert table.column_names == docs[name], name
        assert isinstance(table, pa.Table) and table.num_rows > 0
        assert set(docs) == set(built), "every documented table is built here"
        for key, value in (RUN_ID if name != "resid_cos_sim" else model_part).items():
            assert set(table.column(key).to_pylist()) == {value}
        # an explicit schema survives a Parquet round trip unchanged
        from mlsae_core.atomic import write_parquet

        write_parquet(tmp_path / f"{name}.parquet", table)
        import pyarrow.parquet as pq

        assert pq.read_table(tmp_path / f"{name}.parquet").schema.equals(table.schema)

    lt = built["latent_dists"].to_pylist()
    assert [r["layer_std"] for r in lt[:3]] == pytest.approx([0.0, 1.0, 0.1875**0.5])
    assert math.isnan(lt[3]["layer_mean"]) and lt[3]["live"] is False
    long = built["latent_layer_dists"].to_pylist()
    assert {(r["layer"], r["latent"], r["count"]) for r in long} == {
        (2, 1, 1),
        (2, 2, 1),
        (3, 0, 2),
        (3, 2, 1),
        (5, 1, 1),
    }
    rc = built["resid_cos_sim"].to_pylist()
    assert rc[-1]["next_layer"] is None and rc[-1]["cos_mean"] is None and rc[0]["next_layer"] == 1
    with pytest.raises(ValueError, match="lacks"):
        tables.latent_dists_table(dres, {"model": "tiny"})
    with pytest.raises(ValueError, match="unknown"):
        tables.latent_dists_table(dres, {**RUN_ID, "colour": 1})


def test_layers_label() -> None:
    assert identity.layers_label(range(30)) == "0-29"
    assert identity.layers_label([3]) == "3"
    assert identity.layers_label([0, 2, 5]) == "0,2,5"


def test_reference_csvs(tmp_path: Path) -> None:
    values, indices = planted()
    d = LayerDists(4, [2, 3, 5])
    d.add(values, indices)
    run_id = identity.run_id("tiny", 2, 4, [2, 3, 5])
    table = summaries.dists_layer_std(tables.dists_summary_table(d.result(), run_id))
    rows = summaries.dists_layer_std_csv_rows(table)
    tables.write_dists_layer_std_csv(tmp_path / "dists_layer_std.csv", rows)
    lines = (tmp_path / "dists_layer_std.csv").read_text().splitlines()
    assert lines[0] == (
        "model_name,n_layers,expansion_factor,k,mean,var,std,sem,mean_rel,var_rel,std_rel,sem_rel"
    )
    cells = lines[1].split(",")
    assert cells[:4] == ["tiny", "3", "2", "4"]
    assert float(cells[4]) == pytest.approx(np.mean([0, 1, 0.1875**0.5]))
    w = torch.randn(5, 9)
    rows = summaries.mmcs_csv_rows(summaries.mmcs([(run_id, w)]))
    tables.write_mmcs_csv(tmp_path / "mmcs.csv", rows)
    lines = (tmp_path / "mmcs.csv").read_text().splitlines()
    assert lines[0] == "model_name,expansion_factor,k,mean,var,std,sem"
    assert float(lines[1].split(",")[3]) == pytest.approx(float(max_cos(w).mean()))
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="lacks"):
        tables.write_mmcs_csv(tmp_path / "bad.csv", [{"model_name": "x"}])


def test_reference_rows_keep_a_lens_run_apart_from_its_plain_twin() -> None:
    """test.csv: a run through a tuned lens and a plain run of the same x/k/layers are two
    rows, each with its own tuned_lens flag and its own numbers."""
    from mlsae_core.analysis.tables import reference_test_rows

    base = {"model": "m", "expansion_factor": 2, "k": 4, "layers": "0-3", "layer": "avg"}
    rows = reference_test_rows(
        [{**base, "tuned_lens": False, "fvu": 0.5}, {**base, "tuned_lens": True, "fvu": 0.25}]
    )
    assert [(r["tuned_lens"], r["train/fvu/avg"]) for r in rows] == [(False, 0.5), (True, 0.25)]


# ----- the original code's variance formula and the claims ------------------------------------
def original_variances(latents: torch.Tensor) -> dict[str, float]:
    """tim-lawson/mlsae `mlsae/analysis/variances.py` Metric.update + compute on one batch,
    re-implemented in float64: latents [L, T, F] with inactive entries 0."""
    n_layers = latents.shape[0]
    layers = torch.arange(n_layers, dtype=torch.float64)

    def var(x: torch.Tensor) -> torch.Tensor:
        ell = layers.view((n_layers, *([1] * (x.dim() - 1))))
        return (ell**2 * x).sum(0) - (ell * x).sum(0) ** 2

    probs = (latents / latents.sum(dim=0)).nan_to_num_(0.0)
    e_var_l_f = var(probs.mean(1)).mean()
    e_var_l_tf = var(probs).mean()
    var_l = var(probs.mean((1, 2)))
    return {
        "orig_exp_var_l_f": float(e_var_l_f),
        "orig_exp_var_l_tf": float(e_var_l_tf),
        "orig_var_l": float(var_l),
        "orig_rel_var_f": float(e_var_l_f / var_l),
        "orig_rel_var_t": float(e_var_l_tf / e_var_l_f),
        "orig_ratio": float(e_var_l_f / e_var_l_tf),
    }


def test_original_variance_formula_matches_a_float64_reimplementation() -> None:
    v, i, dense = random_topk(5, 40, 20, 6, seed=4)
    col = TokenLayerVariance(20, range(5))
    for s in range(0, 40, 9):  # batch split does not matter: the test set is one batch
        col.add(v[:, s : s + 9], i[:, s : s + 9])
    got = col.result().summary()
    want = original_variances(torch.where(dense > 1e-3, dense, 0.0))
    assert got.keys() >= want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    # planted: latent 0 at layer 0 on token 0 and layer 2 on token 1; latent 1 never fires
    values = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]], [[0.0], [1.0]]])
    col = TokenLayerVariance(2, [0, 1, 2])
    col.add(values, torch.zeros(3, 2, 1, dtype=torch.long))
    s = col.result().summary()
    # per token the variance is 0; mean probs of latent 0 = [.5, 0, .5]: 0.5*4 - 1^2 = 1
    assert s["orig_exp_var_l_tf"] == 0.0 and s["orig_exp_var_l_f"] == pytest.approx(0.5)
    assert s["ratio"] == math.inf and s["orig_ratio"] == math.inf


def claim_inputs(
    efs=(2, 4), std=(1.0, 1.5), ratio=(2.0, 2.2), seed=0, baseline_shifts=(0.0,)
) -> dict[str, pa.Table]:
    """Planted cross-config inputs of the claims: an MLSAE over layers 0-2 and a single-layer
    SAE at layer 1 per expansion factor (k 8), their layer_std and variance ratios; the
    baseline is trained once per entry of `baseline_shifts` (seeds 0, 1, ...), each seed's
    metrics shifted by its entry."""
    rng = np.random.default_rng(seed)
    run = {"model": "m", "k": 8, "tuned_lens": False}
    metrics, dists, variance, latents = [], [], [], []
    trained = [("0-2", ("0", "1", "2", "avg"), 0, 0.0)]
    trained += [("1", ("1", "avg"), i, shift) for i, shift in enumerate(baseline_shifts)]
    for ef, s, r in zip(efs, std, ratio, strict=True):
        for layers, rows, run_seed, shift in trained:
            for j, layer in enumerate(rows):
                m = {c: 0.1 * ef + 0.01 * j + (0.05 + shift if layers == "1" else 0.0)
                     for c in summaries.COMPARE_METRICS}  # fmt: skip
                metrics.append({**run, "seed": run_seed, "expansion_factor": ef,
                                "layers": layers, "layer": layer, **m})  # fmt: skip
            n_layers = summaries.n_layers_of(layers)
            ids = {**run, "seed": run_seed, "expansion_factor": ef, "layers": layers}
            dists.append({**ids, "n_layers": n_layers, "n_latents": 16, "n_live": 16,
                          **{k: 0.0 for k in tables.LAYER_STD_STATS}, "mean": s, "sem": 0.01})  # fmt: skip
            tok = rng.uniform(0.5, 1.5, 16)
            agg = tok * r + rng.normal(0, 0.05, 16)
            variance.append({**ids, "n_layers": n_layers, "ratio": agg.mean() / tok.mean(),
                             "orig_ratio": 50 * r})  # fmt: skip
            latents += [{**ids, "latent": j, "token_var": t, "aggregate_var": a, "weight": 1.0}
                        for j, (t, a) in enumerate(zip(tok, agg, strict=True))]  # fmt: skip
    return {
        "test_metrics": pa.Table.from_pylist(metrics),
        "dists_layer_std": pa.Table.from_pylist(dists),
        "layer_variance": pa.Table.from_pylist(variance),
        "latent_variance": pa.Table.from_pylist(latents),
    }


def test_claims_against_hand_computations() -> None:
    from mlsae_core.analysis import claims

    t = claim_inputs()
    table = claims.claims_table(**t)
    assert table.schema.equals(claims.CLAIMS_SCHEMA)
    rows = table.to_pylist()
    v = claims.verdicts(table)
    # claim 1 by hand: the MLSAE's layer-1 row next to the single-layer SAE's layer-1 row
    c1 = [r for r in rows if r["claim"] == 1]
    assert len(c1) == 2 * len(claims.CLAIM1_METRICS)
    for r in c1:
        mlsae_row = 0.1 * r["expansion_factor"] + 0.01 * 1
        assert r["layer"] == 1 and r["layers"] == "0-2" and r["n_seeds"] == 1
        assert r["value"] == pytest.approx(mlsae_row)
        assert r["baseline"] == pytest.approx(0.1 * r["expansion_factor"] + 0.05)  # its row 0
        assert r["baseline_spread"] is None or math.isnan(r["baseline_spread"])
    assert v[1][0] == claims.UNSURE and "one seed" in v[1][1]
    # claim 2: the ratio's standard error is the delta method's, from np.cov
    lv = t["latent_variance"].to_pylist()
    for r in (r for r in rows if r["statistic"] == "variance_ratio" and r["claim"] == 2):
        mine = [
            x for x in lv if (x["expansion_factor"], x["layers"]) == (r["expansion_factor"], "0-2")
        ]
        a = np.array([x["aggregate_var"] for x in mine])
        tv = np.array([x["token_var"] for x in mine])
        ratio = a.mean() / tv.mean()
        cov = np.cov(a, tv)
        var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / len(a) / tv.mean() ** 2
        assert r["stderr"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert v[2][0] == claims.FAILS  # about 2x, far below 10^1.5
    orig = sorted(r["value"] for r in rows if r["statistic"] == "orig_variance_ratio")
    assert orig == pytest.approx([100.0, 110.0])
    # claim 3: layer_std 1.0 -> 1.5 (sem 0.01) from x2 to x4 holds; reversed does not hold
    assert v[3][0] == claims.HOLDS
    assert (
        claims.verdicts(claims.claims_table(**claim_inputs(std=(1.5, 1.0))))[3][0] == claims.FAILS
    )


@pytest.mark.parametrize(
    ("shifts", "verdict"),
    [
        # x2: baselines 0.25 and 0.27 (mean 0.26, s 0.0141): MLSAE 0.21 << 1.25 x 0.26
        ((0.0, 0.02), "holds"),
        # x2: baselines 0.05 and 0.06, 1.25 x 0.055 = 0.069 << MLSAE 0.21 (x4: 0.32 < 0.41)
        ((-0.2, -0.19), "does not hold"),
        # one baseline far off: the seed spread swamps the gap
        ((-0.13, 0.3), "cannot tell"),
        # x2 clearly worse (0.21 > 1.25 x 0.1505 = 0.188), x4 within (0.41 < 1.25 x 0.3505):
        # one (config, layer) that does not hold refutes a claim about every layer
        ((-0.1, -0.099), "does not hold"),
    ],
)
def test_claim1_judges_the_gap_by_the_baselines_seed_spread(shifts, verdict) -> None:
    """Claim 1 with two baseline seeds, by hand: the baselines' mean and sample std, the
    MLSAE within 1.25x their mean beyond 2 * s * sqrt(1 + 1/n)."""
    from mlsae_core.analysis import claims

    table = claims.claims_table(**claim_inputs(baseline_shifts=shifts))
    for r in (r for r in table.to_pylist() if r["claim"] == 1):
        ef = r["expansion_factor"]
        seeds = [0.1 * ef + 0.05 + shift for shift in shifts]
        assert r["n_seeds"] == 2
        assert r["value"] == pytest.approx(0.1 * ef + 0.01)
        assert r["baseline"] == pytest.approx(np.mean(seeds))
        assert r["baseline_spread"] == pytest.approx(np.std(seeds, ddof=1))
    got, reason = claims.verdicts(table)[1]
    assert got == verdict, reason
    assert "2+ seeds" in reason
    if shifts == (-0.1, -0.099):  # x2 fails by both FVUs; 1 - loss_recovered 0.79 <= 0.85 holds
        assert (
            "1 of 2 (config, layer) pairs clearly worse by fvu_standardized (layer(s) 1); "
            "held at layer(s) 1;" in reason
        )
    assert (
        claims.verdicts(claims.claims_table(**claim_inputs(std=(1.0, 1.01))))[3][0] == claims.UNSURE
    )
    big = claims.verdicts(claims.claims_table(**claim_inputs(ratio=(200.0, 300.0))))
    assert big[2][0] == claims.HOLDS
    # one expansion factor and no baseline: cannot tell, with the reason
    one = claim_inputs(efs=(2,), std=(1.0,), ratio=(2.0,))
    one["test_metrics"] = one["test_metrics"].filter(
        pa.compute.equal(one["test_metrics"]["layers"], "0-2")
    )
    v1 = claims.verdicts(claims.claims_table(**one))
    assert v1[1] == (claims.UNSURE, v1[1][1]) and "no single-layer baseline" in v1[1][1]
    assert v1[3][0] == claims.UNSURE and "only one expansion factor" in v1[3][1]
