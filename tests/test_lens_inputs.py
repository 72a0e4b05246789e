"""MLSAEs on tuned-lens inputs (`--tuned_lens`): the SAE sees T_l(h_l), reconstruction metrics
are in that space, and each reconstruction is mapped back through T_l^-1 before splicing.

References are independent: the lens applied by hand in float64, and the unmodified HF model
run with block l's output replaced through a forward hook.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mlsae_core.cli import main
from mlsae_core.config import ConfigError, EvalConfig, SAEConfig, TrainConfig
from mlsae_core.evaluate import evaluate, prediction_mask
from mlsae_core.identity import run_id_of
from mlsae_core.lens import LensedActivations, TunedLens
from mlsae_core.runs import load_for_test
from mlsae_core.sae import MLSAE
from mlsae_core.train import LiveActivations, read_history, train
from tests.test_cli import corpus_dir, tiny_model_dir, train_args  # noqa: F401 - fixtures
from tests.test_families import _hf_logits  # the unmodified model, a block's output hooked
from tests.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    dense_latents,
    splice_logits,
    tiny_transformer,
)

L, D = 3, 32


def random_lens(seed: int = 0, scale: float = 0.1) -> TunedLens:
    """A non-trivial lens: A_l ~ scale * N(0, 1/d), b_l ~ scale * N(0, 1); the last identity."""
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(L, D, "tiny")
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(L, D, D, generator=g) / math.sqrt(D))
        lens.bias.copy_(scale * torch.randn(L, D, generator=g))
        lens.weight[-1].zero_()
        lens.bias[-1].zero_()
    return lens


@pytest.fixture(scope="module")
def tt():
    return tiny_transformer("llama", n_layers=L, d=D)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(4, 64, (4, 12), generator=g)
    toks[:, 0] = BOS_ID
    toks[1, 6] = EOS_ID
    toks[2, 9] = PAD_ID
    return toks


def test_evaluate_through_a_lens_equals_a_hand_computation(tt, tokens):
    lens = random_lens()
    mask = ~torch.isin(tokens, torch.tensor([PAD_ID, BOS_ID, EOS_ID]))
    torch.manual_seed(0)
    sae = MLSAE(D, 64, 4)
    layers = [0, 1]
    res = evaluate(tt, sae, tokens, mask, layers, batch_size=4, progress=False,
                   delta_dtype="float32", lens=lens)  # fmt: skip
    with torch.no_grad():
        acts = tt.activations(tokens, layers)  # [L, B, P, d]
    pred = prediction_mask(mask)[:, :-1]
    targets = tokens[:, 1:][pred]
    lp_c = torch.log_softmax(_hf_logits(tt, tokens).double(), -1)[:, :-1][pred]
    for i, layer in enumerate(layers):
        a = lens.weight[layer].detach().double()
        b = lens.bias[layer].detach().double()
        h = acts[i][mask].double()  # [N, d]
        x = h + h @ a.T + b  # the lens by hand, float64
        with torch.no_grad():
            recons = sae(x.float()[None]).recons[0].double()
        fvu = ((recons - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        row = res.rows[i]
        assert math.isclose(row["fvu"], float(fvu), rel_tol=1e-5), (layer, row["fvu"], fvu)
        # back to the model's space: solve (I + A) h = r - b, float64
        back = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + a, (recons - b).T).T
        replacement = acts[i].clone()
        replacement[mask] = back.float()
        lp_s = torch.log_softmax(_hf_logits(tt, tokens, layer, replacement).double(), -1)
        lp_s = lp_s[:, :-1][pred]
        ce_s = float(-lp_s.gather(-1, targets[:, None]).mean())
        kl = float((lp_c.exp() * (lp_c - lp_s)).sum(-1).mean())
        assert row["kl"] > 1e-4  # a random SAE: a measurable splice effect
        assert math.isclose(row["ce_spliced"], ce_s, rel_tol=1e-4), (layer, row["ce_spliced"])
        assert math.isclose(row["kl"], kl, rel_tol=1e-4), (layer, row["kl"], kl)


def test_the_identity_lens_changes_nothing(tt, tokens):
    mask = ~torch.isin(tokens, torch.tensor([PAD_ID, BOS_ID, EOS_ID]))
    torch.manual_seed(0)
    sae = MLSAE(D, 64, 4)
    kw = dict(batch_size=4, progress=False, delta_dtype="float32")
    plain = evaluate(tt, sae, tokens, mask, [0, 2], **kw).rows
    ident = evaluate(tt, sae, tokens, mask, [0, 2], lens=TunedLens(L, D), **kw).rows
    for p, q in zip(plain, ident, strict=True):
        for key in ("fvu", "mse", "ce_spliced", "kl"):
            assert math.isclose(p[key], q[key], rel_tol=1e-6, abs_tol=1e-9), key


def _train(tmp, tt, tokens, lens, steps=None):
    layers = list(range(L))
    source = LensedActivations(LiveActivations(tt, tokens, layers), lens, layers)
    masks = ~torch.isin(tokens, torch.tensor([PAD_ID, BOS_ID, EOS_ID]))
    return train(
        source, masks, SAEConfig(expansion_factor=2, k=4, auxk=8, dead_tokens_threshold=40),
        TrainConfig(lr=3e-3, accumulate_grad_batches=1, checkpoint_every=2, device="cpu"),
        tmp, batch_size=1, max_tokens=12 * 8, progress=False, stop_after_steps=steps,
        lens=lens,
    )  # fmt: skip


def test_training_through_a_lens_resumes_bit_identically(tt, tokens, tmp_path):
    lens = random_lens()
    full = _train(tmp_path / "a", tt, tokens, lens)
    _train(tmp_path / "b", tt, tokens, lens, steps=3)  # checkpoint at step 2
    resumed = _train(tmp_path / "b", tt, tokens, lens)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in read_history(tmp_path / "a")] == [
        r["loss"] for r in read_history(tmp_path / "b")
    ]
    with pytest.raises(ValueError, match="inputs"):  # another lens: refused, not resumed
        _train(tmp_path / "b", tt, tokens, random_lens(seed=5))


def test_cli_train_test_with_a_lens(tiny_model_dir, corpus_dir, tmp_path, capsys):  # noqa: F811
    lens = random_lens()
    lens.save(tmp_path / "lens")
    out = tmp_path / "sae"
    assert main(train_args(tiny_model_dir, corpus_dir, out, "--tuned_lens",
                           str(tmp_path / "lens"))) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tuned_lens"] is True and cfg["lens_fingerprint"] == lens.fingerprint()
    assert TunedLens.load(out / "lens").fingerprint() == lens.fingerprint()  # its own copy
    sae = MLSAE.from_pretrained(out)
    assert run_id_of(sae)["tuned_lens"] is True
    # test finds the run's own copy: no flag needed
    assert main(["test", "--repo_id", str(out), "--max_tokens", "128", "--device", "cpu"]) == 0
    table = pq.read_table(out / "test_metrics.parquet")
    assert "tuned_lens" in table.column_names and all(table.column("tuned_lens").to_pylist())
    cfg_eval = EvalConfig(max_tokens=128, device="cpu")
    setup = load_for_test(out, cfg_eval, tuned_lens=tmp_path / "lens")  # the same lens: fine
    assert setup.lens is not None and setup.lens.fingerprint() == lens.fingerprint()
    random_lens(seed=3).save(tmp_path / "other")
    with pytest.raises(ConfigError, match="not the one"):
        load_for_test(out, cfg_eval, tuned_lens=tmp_path / "other")
    # resuming into the same directory through another lens is refused before training
    argv = train_args(tiny_model_dir, corpus_dir, out, "--tuned_lens", str(tmp_path / "other"))
    assert main([*argv, "--max_tokens", "2048"]) != 0
    assert "holds a run trained through another tuned lens" in capsys.readouterr().err


def test_a_plain_checkpoint_refuses_a_lens(tiny_model_dir, corpus_dir, tmp_path):  # noqa: F811
    assert main(train_args(tiny_model_dir, corpus_dir, tmp_path / "sae")) == 0
    random_lens().save(tmp_path / "lens")
    sae = MLSAE.from_pretrained(tmp_path / "sae")
    assert run_id_of(sae)["tuned_lens"] is False
    with pytest.raises(ConfigError, match="plain activations"):
        load_for_test(tmp_path / "sae", EvalConfig(max_tokens=128, device="cpu"),
                      tuned_lens=tmp_path / "lens")  # fmt: skip


def test_a_lens_for_another_model_is_refused(tiny_model_dir, corpus_dir, tmp_path, capsys):  # noqa: F811
    TunedLens(L + 1, D).save(tmp_path / "lens")
    argv = train_args(tiny_model_dir, corpus_dir, tmp_path / "sae", "--tuned_lens",
                      str(tmp_path / "lens"))  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "was trained for 4 layers of width 32; the model has 3 layers" in err, err


def test_lens_directions_map_through_the_linear_part(tmp_path: Path):
    lens = random_lens(seed=2, scale=0.3)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, D, generator=g)
    v = torch.randn(D, generator=g)
    for layer in range(L):
        moved = lens.transform(h[None], [layer])[0] + 0.7 * v  # a step along v, lens space
        back = lens.inverse(moved[None], [layer])[0]
        want = h + 0.7 * lens.inverse_direction(v, layer)
        torch.testing.assert_close(back, want, rtol=1e-5, atol=1e-5)


SWEEP = """
name: lens-smoke
models: [tiny-llama]
grid:
  expansion_factor: [2]
  k: [4]
  layers: [all, [1]]
  tuned_lens: [false, true]
sae: {auxk: 16, dead_tokens_threshold: 2000}
data: {dataset: tiny-text, max_length: 32, test_fraction: 0.2, max_tokens: 512, batch_size: 2}
train: {device: cpu, accumulate_grad_batches: 2, lr: 0.001, checkpoint_every: 100}
eval: {device: cpu, max_tokens: 128, splice_max_tokens: 64, batch_size: 4, n_examples: 2,
       n_context: 1, resid_tokens: 128}
lens: {max_tokens: 512, steps: 8, batch_size: 64, eval_tokens: 128, device: cpu}
"""


def test_a_sweep_with_the_tuned_lens_dimension(tmp_path):
    """grid.tuned_lens doubles the configs; the tuned_lens asset trains the model's lens once;
    the lens configs train through it and every table says which is which."""
    from mlsae_core.layout import StorageLayout
    from tests.conftest import run_sweep_text

    sw, data = run_sweep_text(tmp_path, "lens-smoke", SWEEP)
    assert sw.sae_keys == ["x2-k4-Lall", "x2-k4-Lall-lens", "x2-k4-L1", "x2-k4-L1-lens"]
    layout = StorageLayout(data)
    lens = TunedLens.load(layout.lens_dir("tiny-llama"))
    assert [r["layer"] for r in lens.kl_table] == [0, 1, 2, 3]  # measured on test chunks
    for key in ("x2-k4-Lall-lens", "x2-k4-L1-lens"):
        run = layout.run("tiny-llama", key)
        assert TunedLens.load(run.lens).fingerprint() == lens.fingerprint()
    assert not layout.run("tiny-llama", "x2-k4-Lall").lens.exists()
    metrics = pq.read_table(layout.run("tiny-llama", "x2-k4-Lall-lens").table("test_metrics"))
    assert set(metrics.column("tuned_lens").to_pylist()) == {True}
    summary = pq.read_table(layout.table("test_summary")).to_pylist()
    assert sorted((r["layers"], r["tuned_lens"]) for r in summary) == [
        ("0-3", False), ("0-3", True), ("1", False), ("1", True),
    ]  # fmt: skip
    plain = {r["tuned_lens"]: r for r in summary if r["layers"] == "0-3"}
    assert plain[True]["fvu"] != plain[False]["fvu"]  # other inputs, another dictionary
    comparison = pq.read_table(layout.table("single_layer_comparison")).to_pylist()
    assert sorted(r["tuned_lens"] for r in comparison) == [False, True]  # lens vs lens only


def test_explorer_through_a_lens(tmp_path):
    """The explorer's latents are of T_l(h_l); its reconstruction splice is T_l^-1 of the
    reconstruction, and steering moves h_l by (I + A_l)^-1 of the lens-space step."""
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import create_app

    tt = tiny_transformer("llama", n_layers=L, d=D)
    torch.manual_seed(1)
    sae = MLSAE(D, 64, 4, auxk=None, metadata={"model_name": "tiny", "layers": [0, 1, 2]})
    lens = random_lens(seed=4)
    prompt = "When Mary and John went to the store , John gave a drink to"
    ids = tt.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    layer, pos = 1, 5
    with torch.no_grad():
        h = tt.activations(tokens, [layer])[0, 0]  # [P, d]
        x = lens.transform(h[None], [layer])[0]
        out = sae(x[None])
        clean = tt.model(input_ids=tokens).logits[0, pos].double()
    a = lens.weight[layer].detach().double()
    b = lens.bias[layer].detach().double()
    eye = torch.eye(D, dtype=torch.float64)
    back = torch.linalg.solve(eye + a, (out.recons[0].double() - b).T).T.float()
    want_recons = splice_logits(tt, tokens, layer, back[None])
    with TestClient(create_app(sae, tt, lens=lens), raise_server_exceptions=False) as c:
        assert c.get("/api/info").json()["sae"]["tuned_lens"] is True
        body = {"prompt": prompt, "position": pos, "layer": layer, "top_k": 3}
        got = c.post("/api/logits", json=body).json()
        delta = want_recons[0, pos].double() - clean
        assert got["recons"]["max_abs_delta"] == pytest.approx(float(delta.abs().max()), rel=1e-4)
        dense = dense_latents(out.topk, sae.n_latents)[0]  # [P, n]
        j = int(dense[: pos + 1].sum(0).argmax())
        steer = c.post("/api/logits", json={**body, "latent": j, "factor": 0.0}).json()["steer"]
    v = dense[:, j].double()[:, None]
    s = out.stats.std[0].double()
    step = -(v * s) * sae.decoder.weight[:, j].detach().double()[None, :]  # lens space
    repl = h.double() + torch.linalg.solve(eye + a, step.T).T
    want = splice_logits(tt, tokens, layer, repl.float()[None])
    assert steer["max_abs_delta"] == pytest.approx(
        float((want[0, pos].double() - clean).abs().max()), rel=1e-4
    )
