"""The activation cache: equals live activations up to float16, trains like them, refuses
a cache built from another model, other tokens or other layers."""

from __future__ import annotations

import json

import pytest
import torch

from mlsae_core import atomic
from mlsae_core.cache import ActivationCache, CacheMismatchError
from mlsae_core.config import SAEConfig, TrainConfig
from mlsae_core.train import LiveActivations, read_history, train
from tests.tiny import tiny_transformer


@pytest.fixture(scope="module")
def tt():
    return tiny_transformer("llama", n_layers=3, d=32)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 101, (10, 16), generator=g)


def test_cache_equals_live_within_fp16(tt, tokens, tmp_path):
    cache = ActivationCache.build(tt, tokens, [0, 2], tmp_path / "c", shard_rows=3, progress=False)
    assert (cache.n_layers, cache.d_model, len(cache)) == (2, 32, 10)
    assert len(list((tmp_path / "c").glob("shard_*.npy"))) == 4  # 3+3+3+1 rows
    rows = torch.tensor([9, 0, 4, 3, 5])  # out of order, across shards
    got = cache(rows)
    live = LiveActivations(tt, tokens, [0, 2])(rows)
    assert got.dtype == torch.float32 and got.shape == live.shape
    torch.testing.assert_close(got, live, rtol=2**-10, atol=1e-6)
    assert torch.equal(got, live.half().float())  # exactly the float16 rounding


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_from_cache_matches_live(tt, tokens, tmp_path, precision):
    """The cache's forward runs in the runs' precision, so cached training tracks live
    training in either precision (to float16 storage rounding, far below bf16's)."""
    layers = [0, 1, 2]
    masks = torch.ones_like(tokens, dtype=torch.bool)
    masks[:, 0] = False
    cache = ActivationCache.build(
        tt, tokens, layers, tmp_path / "c", shard_rows=4, progress=False,
        precision=getattr(torch, precision),
    )  # fmt: skip
    sae_cfg = SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=100)
    train_cfg = TrainConfig(
        lr=3e-3, accumulate_grad_batches=1, checkpoint_every=100, device="cpu", precision=precision
    )
    kw = dict(batch_size=2, max_tokens=2 * 16 * 15, progress=False)
    a = train(LiveActivations(tt, tokens, layers), masks, sae_cfg, train_cfg, tmp_path / "a", **kw)
    b = train(cache, masks, sae_cfg, train_cfg, tmp_path / "b", **kw)
    fa = [r["fvu"] for r in read_history(tmp_path / "a")]
    fb = [r["fvu"] for r in read_history(tmp_path / "b")]
    assert len(fa) == len(fb) == 15
    assert fa[-1] < fa[0]  # it learned something
    # fp16 storage rounding may flip a near-tied TopK choice; in bfloat16 the inputs are
    # rounded again to 8 bits (u = 2^-8 ~ 4e-3) before the selection, so ties flip more often
    tol = 2e-3 if precision == "float32" else 1e-2
    for x, y in zip(fa, fb, strict=True):
        assert abs(x - y) <= tol * abs(x), (x, y)
    # weights agree closely, not exactly
    diff = (a.encoder.weight - b.encoder.weight).norm() / a.encoder.weight.norm()
    assert diff < 5 * tol, float(diff)


def test_mismatched_cache_refused(tt, tokens, tmp_path):
    ActivationCache.build(tt, tokens, [0, 1], tmp_path / "c", progress=False)
    ActivationCache.open(tmp_path / "c", transformer=tt, tokens=tokens, layers=[0, 1])
    with pytest.raises(CacheMismatchError, match="layers"):
        ActivationCache.open(tmp_path / "c", layers=[0, 2])
    with pytest.raises(CacheMismatchError, match="tokens_sha256"):
        ActivationCache.open(tmp_path / "c", tokens=tokens.flip(0))
    other = tiny_transformer("llama", n_layers=3, d=32, seed=1)  # same name, other weights
    with pytest.raises(CacheMismatchError, match="model_fingerprint"):
        ActivationCache.open(tmp_path / "c", transformer=other)
    with pytest.raises(CacheMismatchError, match="precision='float32' but 'bfloat16'"):
        ActivationCache.open(tmp_path / "c", precision=torch.bfloat16)
    info = json.loads((tmp_path / "c" / "cache.json").read_text())
    info["version"] = 99
    atomic.write_json(tmp_path / "c" / "cache.json", info)
    atomic.record(tmp_path / "c", ["cache.json"])  # a recorded file of another format
    with pytest.raises(CacheMismatchError, match="v99 is not"):
        ActivationCache.open(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match="not a finished activation cache"):
        ActivationCache.open(tmp_path / "nothing")


def test_layer_selection_and_open_or_build(tmp_path):
    """A single-layer baseline reads its layer from the shared cache; reuse needs a match."""
    from mlsae_core.cache import ActivationCache, CacheMismatchError
    from tests.tiny import tiny_transformer

    t = tiny_transformer("llama", n_layers=3, d=32)
    tokens = torch.randint(4, 40, (6, 8), generator=torch.Generator().manual_seed(0))
    cache = ActivationCache.open_or_build(tmp_path / "c", t, tokens, progress=False)
    rows = torch.tensor([5, 0, 3])
    live = t.activations(tokens[rows])
    one = cache.select([2])
    assert one.n_layers == 1
    torch.testing.assert_close(one(rows), live[2:3], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cache.select([0, 2])(rows), live[[0, 2]], rtol=2e-3, atol=2e-3)
    built = (tmp_path / "c" / "cache.json").stat().st_mtime_ns
    ActivationCache.open_or_build(tmp_path / "c", t, tokens, progress=False)  # reused
    assert (tmp_path / "c" / "cache.json").stat().st_mtime_ns == built
    ActivationCache.open_or_build(tmp_path / "c", t, tokens[:4], progress=False)  # other tokens
    assert len(ActivationCache.open(tmp_path / "c")) == 4
    with pytest.raises(CacheMismatchError, match=r"layers \[7\]"):
        cache.select([7])


def test_cache_files_verified_by_the_manifest(tt, tokens, tmp_path, monkeypatch):
    """Every open verifies cache.json and every shard (`atomic.verify`); a mismatch, a
    truncation or an unrecorded file is CacheCorruptError naming the file, and is rebuilt."""
    from mlsae_core.cache import CacheCorruptError

    ActivationCache.build(tt, tokens, [0, 1], tmp_path / "c", shard_rows=4, progress=False)
    recorded = atomic.read_manifest(tmp_path / "c")
    assert sorted(recorded) == ["cache.json", *(f"shard_0000{i}.npy" for i in range(3))]
    checked = []
    real = atomic.verify
    monkeypatch.setattr(atomic, "verify", lambda d, names: checked.extend(names) or real(d, names))
    ActivationCache.open(tmp_path / "c")
    assert sorted(checked) == sorted(recorded)
    shard = tmp_path / "c" / "shard_00001.npy"
    kept = shard.read_bytes()
    with open(shard, "r+b") as f:  # 8 bytes in the data
        f.seek(200)
        f.write(b"\0" * 8)
    with pytest.raises(CacheCorruptError, match=r"shard_00001.npy does not match the sha256"):
        ActivationCache.open(tmp_path / "c")
    assert ActivationCache.open(tmp_path / "c", verify=False).n_rows == 10  # inspection only
    shard.write_bytes(kept)

    path = tmp_path / "c" / "cache.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "shard_rows": 5}))  # valid JSON, edited
    with pytest.raises(CacheCorruptError, match=r"cache.json does not match the sha256"):
        ActivationCache.open(tmp_path / "c", verify=False)
    path.write_text(good)
    atomic.record(tmp_path / "c", [], forget=["shard_00002.npy"])  # an entry deleted
    with pytest.raises(CacheCorruptError, match=r"shard_00002.npy is not recorded"):
        ActivationCache.open(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()  # no manifest at all: nothing is trusted
    with pytest.raises(CacheCorruptError, match=r"cache.json is not recorded"):
        ActivationCache.open(tmp_path / "c", verify=False)
    rebuilt = ActivationCache.open_or_build(tmp_path / "c", tt, tokens, progress=False)
    assert rebuilt.n_rows == 10 and set(atomic.read_manifest(tmp_path / "c")) >= {"cache.json"}
