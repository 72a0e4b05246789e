"""The MLSAE against independent computations: float64 dense references, brute force, analytics."""

from __future__ import annotations

import json

import pytest
import torch

from mlsae_core import atomic
from mlsae_core.checkpoint import CheckpointError
from mlsae_core.losses import auxk_loss, fvu_per_layer, total_loss
from mlsae_core.sae import MLSAE, TopK, geometric_median, standardize
from mlsae_core.sparse import sparse_decode


def make_sae(d=12, n=48, k=4, auxk=8, dtype=torch.float64, seed=0, **kw) -> MLSAE:
    torch.manual_seed(seed)
    return MLSAE(d, n, k, auxk=auxk, **kw).to(dtype)


def test_standardize_round_trip_and_moments():
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 7 + 3
    xs, stats = standardize(x)
    back = xs * (stats.std + 1e-5) + stats.mean
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(
        xs.mean(-1), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # Bessel-corrected std of the standardized vector is s / (s + eps) ~ 1
    torch.testing.assert_close(xs.std(-1), (stats.std / (stats.std + 1e-5)).squeeze(-1))


def test_topk_exactly_k_nonnegative_and_largest():
    sae = make_sae()
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    out = sae(x)
    assert out.topk.values.shape == (2, 30, 4)
    assert (out.topk.values >= 0).all()
    idx = out.topk.indices.reshape(-1, 4)
    assert all(len(set(r.tolist())) == 4 for r in idx)
    # independent: dense pre-activations in float64
    xs, _ = standardize(x.reshape(-1, 12))
    z = (xs - sae.pre_encoder_bias) @ sae.encoder.weight.T
    want = torch.topk(z, 4).values.relu().sort(-1).values
    got = out.topk.values.reshape(-1, 4).sort(-1).values
    torch.testing.assert_close(got, want)


def test_sparse_decode_equals_dense_float64():
    torch.manual_seed(1)
    n, d, k = 40, 10, 5
    w_t = torch.randn(n, d, dtype=torch.float64)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(17)])
    vals = torch.rand(17, k, dtype=torch.float64)
    dense = torch.zeros(17, n, dtype=torch.float64).scatter_(1, idx, vals)
    torch.testing.assert_close(sparse_decode(idx, vals, w_t), dense @ w_t)


def dense_reference_loss(sae: MLSAE, x: torch.Tensor) -> torch.Tensor:
    """The same model written densely: full [N, n] latents, plain autograd through topk."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, sae.n_inputs)
    mu = flat.mean(-1, keepdim=True)
    sd = (flat - mu).std(-1, keepdim=True)
    xs = (flat - mu) / (sd + 1e-5)
    z = (xs - sae.pre_encoder_bias) @ sae.encoder.weight.T
    top = torch.topk(z, sae.k)
    lat = torch.zeros_like(z).scatter(1, top.indices, top.values.relu())
    r = (lat @ sae.decoder.weight.T + sae.pre_encoder_bias) * sd + mu
    return fvu_per_layer(x, r.reshape(*lead, -1)).mean()


def test_sparse_gradients_equal_dense_float64():
    sae = make_sae(auxk=None)
    x = torch.randn(3, 20, 12, dtype=torch.float64)
    sae.init_pre_encoder_bias(x)
    ref = dense_reference_loss(sae, x)
    ref.backward()
    ref_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    loss, main, _ = total_loss(x, sae(x), 1 / 32)
    loss.backward()
    torch.testing.assert_close(main.detach(), ref.detach())
    for p, g in zip(sae.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_decoder_unit_norm_and_projected_gradient_orthogonal():
    sae = make_sae(dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(2, 16, 12)
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(48))
    for _ in range(3):
        loss, _, _ = total_loss(x, sae(x), 1 / 32)
        loss.backward()
        sae.project_decoder_grad()
        w, g = sae.decoder.weight, sae.decoder.weight.grad
        assert (w * g).sum(0).abs().max() < 1e-6
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(48))


def test_geometric_median_matches_brute_force():
    torch.manual_seed(3)
    pts = torch.cat([torch.randn(20, 2), torch.randn(3, 2) * 30 + 50]).double()

    def cost(p):
        return (pts - p).norm(dim=-1).sum()

    gm = geometric_median(pts)
    # brute force over a fine grid around the data
    xs = torch.linspace(-3, 3, 601, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    costs = (pts[None] - grid[:, None]).norm(dim=-1).sum(-1)
    best = grid[costs.argmin()]
    assert cost(gm) <= costs.min() + 1e-6
    assert (gm - best).norm() < 0.02
    assert (gm - pts.mean(0)).norm() > 1  # the mean is dragged by outliers, the median is not


def test_auxk_zero_without_dead_and_finite_with_dead():
    sae = make_sae(dead_tokens_threshold=5)
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    out = sae(x)
    assert out.auxk is None
    assert float(auxk_loss(x, out)) == 0.0
    sae.update_dead(torch.zeros(48, dtype=torch.bool), 10)  # everything dead now
    out = sae(x)
    assert out.auxk is not None and out.auxk.values.shape[-1] == 8
    aux = auxk_loss(x, out)
    assert torch.isfinite(aux) and aux > 0
    # a latent that fires is no longer dead
    fired = torch.zeros(48, dtype=torch.bool)
    fired[3] = True
    sae.update_dead(fired, 1)
    assert not sae.dead_mask()[3] and sae.dead_mask().sum() == 47


def test_dead_counted_in_tokens():
    sae = make_sae(dead_tokens_threshold=100)
    none = torch.zeros(48, dtype=torch.bool)
    sae.update_dead(none, 60)
    assert not sae.dead_mask().any()
    sae.update_dead(none, 40)
    assert sae.dead_mask().all()


def test_save_load_round_trip(tmp_path):
    sae = make_sae(dtype=torch.float32, metadata={"model_name": "tiny", "layers": [0, 1]})
    sae.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key in ("n_inputs", "n_latents", "k", "auxk", "dead_threshold", "standardize"):
        assert key in cfg
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "encoder.weight": (48, 12),
        "decoder.weight": (12, 48),
        "pre_encoder_bias": (12,),
    }
    loaded = MLSAE.from_pretrained(tmp_path / "ck")
    assert loaded.metadata["layers"] == [0, 1]
    recorded = atomic.read_manifest(tmp_path / "ck")
    assert set(recorded) == {"model.safetensors", "config.json"}
    assert "weights_sha256" not in cfg  # one integrity rule: the manifest, not config.json
    for a, b in zip(sae.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(sae(x).recons, loaded(x).recons)
    # a foreign checkpoint (no manifest, e.g. a hub repo written by other tools) loads as it is
    (tmp_path / "ck" / "manifest.json").unlink()
    foreign = MLSAE.from_pretrained(tmp_path / "ck")
    assert torch.equal(foreign.encoder.weight, loaded.encoder.weight)


def test_mismatched_checkpoint_refused(tmp_path):
    sae = make_sae(dtype=torch.float32)
    sae.save_pretrained(tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    with pytest.raises(CheckpointError, match="k=4 but 8"):
        MLSAE.from_pretrained(tmp_path / "ck", k=8)
    cfg["n_latents"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json does not match the sha256"):
        MLSAE.from_pretrained(tmp_path / "ck")
    atomic.record(tmp_path / "ck", ["config.json"])  # a hand edit, recorded: still refused
    with pytest.raises(CheckpointError, match=r"disagrees .* on \['n_latents'\]"):
        MLSAE.from_pretrained(tmp_path / "ck")
    # a checkpoint without the embedded config or a manifest (the reference's): shapes checked
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ck" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="encoder.weight has shape"):
        MLSAE.from_pretrained(tmp_path / "ck")
    del cfg["n_inputs"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks required keys"):
        MLSAE.from_pretrained(tmp_path / "ck")


def test_truncated_or_tampered_checkpoint_refused(tmp_path):
    sae = make_sae(dtype=torch.float32)
    sae.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the sha256") as e:
        MLSAE.from_pretrained(tmp_path / "ck")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit in the middle, where no parser looks
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the sha256"):
        MLSAE.from_pretrained(tmp_path / "ck")
    weights.write_bytes(data)
    atomic.record(tmp_path / "ck", [], forget=["model.safetensors"])  # the entry deleted
    with pytest.raises(CheckpointError, match=r"model.safetensors is not recorded in"):
        MLSAE.from_pretrained(tmp_path / "ck")
    # without a manifest (a foreign checkpoint), safetensors' own checks still refuse it
    (tmp_path / "ck" / "manifest.json").unlink()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MLSAE.from_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="does not exist"):
        MLSAE.from_pretrained(tmp_path / "nope" / "x")


def test_decode_api_matches_forward():
    sae = make_sae()
    x = torch.randn(4, 12, dtype=torch.float64)
    enc = sae.encode(x)
    recons = sae.decode(TopK(enc.topk.values.relu(), enc.topk.indices), enc.stats)
    torch.testing.assert_close(recons, sae(x).recons)
