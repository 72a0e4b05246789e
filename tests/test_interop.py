"""MLSAEs in and out of the field's own packages, loaded by THEIR code: SAELens reads our export
(a) and saves it back for us (c); a SAE built and saved by sparsify loads through ours (b)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mlsae_core.checkpoint import CheckpointError
from mlsae_core.cli import main
from mlsae_core.config import EvalConfig
from mlsae_core.runs import load_for_test
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer
from tests.test_cli import corpus_dir, tiny_model_dir, train_args  # noqa: F401 - fixtures

sae_lens = pytest.importorskip("sae_lens", reason="the dev extra installs sae-lens")
sparsify = pytest.importorskip("sparsify", reason="the dev extra installs eai-sparsify")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, corpus_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny MLSAE over layers 0-2 with its layer distributions, its pre-encoder bias moved off
    zero so that a dropped bias would show."""
    run = tmp_path_factory.mktemp("run") / "sae"
    assert main(train_args(tiny_model_dir, corpus_dir, run)) == 0
    assert main(["dists", "--repo_id", str(run), "--max_tokens", "256"]) == 0
    return run


def _dense(sae: MLSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our latents (dense, ReLU'd top-k) and reconstruction of `x` [N, d]."""
    out = sae(x)
    dense = torch.zeros(x.shape[0], sae.n_latents).scatter_(-1, out.topk.indices, out.topk.values)
    return dense, out.recons


@torch.no_grad()
def test_saelens_loads_the_export_and_agrees_at_every_layer(trained, tiny_model_dir, tmp_path):  # noqa: F811
    from sae_lens import SAE
    from sae_lens.load_model import load_model

    out = tmp_path / "saelens"
    assert (
        main(["export", "--format", "saelens", "--repo_id", str(trained), "--out", str(out)]) == 0
    )
    ours = MLSAE.from_pretrained(trained)
    tr = Transformer.load(str(tiny_model_dir))
    tokens = torch.randint(4, tr.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    acts = tr.activations(tokens)  # [L, 2, 12, d]
    hooks = [f"model.layers.{layer}" for layer in (0, 1, 2)]
    assert sorted(p.name for p in out.iterdir()) == ["dataset", *hooks]
    # SAELens's own wrapper of the HF model: the hook name reads the activations we trained on
    proxy = load_model("AutoModelForCausalLM", str(tiny_model_dir), device="cpu")
    _, cache = proxy.run_with_cache(tokens, names_filter=hooks)
    for layer, hook in enumerate(hooks):
        torch.testing.assert_close(cache[hook], acts[layer], rtol=1e-5, atol=1e-5)
        theirs = SAE.load_from_disk(str(out / hook))
        assert theirs.cfg.normalize_activations == "layer_norm"
        assert theirs.cfg.metadata.hook_name == hook
        assert theirs.cfg.metadata.model_name == str(tiny_model_dir.resolve())
        assert theirs.cfg.metadata.prepend_bos is False  # our chunks carry no BOS
        x = acts[layer].reshape(-1, ours.n_inputs)
        want, recons = _dense(ours, x)
        got = theirs.encode(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got > 0, want > 0)  # the same latents fire
        torch.testing.assert_close(theirs.decode(got), recons, rtol=1e-5, atol=1e-5)
        sparsity = sae_lens.saes.sae.load_file(str(out / hook / "sparsity.safetensors"))
        layer_dists = pq.read_table(trained / "latent_layer_dists.parquet").to_pylist()
        fired = {r["latent"] for r in layer_dists if r["layer"] == layer and r["count"] > 0}
        assert set((sparsity["sparsity"] > -10).nonzero().flatten().tolist()) == fired


def test_ours_to_saelens_and_back_is_lossless(trained, tmp_path):
    from sae_lens import SAE

    out = tmp_path / "saelens"
    assert (
        main(["export", "--format", "saelens", "--repo_id", str(trained), "--out", str(out)]) == 0
    )
    resaved = tmp_path / "resaved"
    SAE.load_from_disk(str(out / "model.layers.1")).save_model(str(resaved))  # SAELens's own save
    back, ours = MLSAE.from_pretrained(resaved), MLSAE.from_pretrained(trained)
    assert back.metadata["layers"] == ours.metadata["layers"] == [0, 1, 2]
    assert (back.k, back.standardize, back.encoder.bias) == (ours.k, ours.standardize, None)
    for key in ("model_name", "dataset", "max_length"):
        assert back.metadata[key] == ours.metadata[key], key
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


# Measured 2026-12-07 (this fixture): FVU 5e-6, MSE 1e-7, L0 0; dCE 7e-2, KL 3e-3 relative. The
# splice metrics differ by definition, not by mapping: SAELens splices the SAE at every position
# and averages over positions whose input token is not special; mlsae splices only non-special
# positions and counts those whose input and next token are both non-special (docs/interop.md).
REL = {"fvu": 1e-4, "mse": 1e-4, "l0": 1e-9, "dce": 0.15, "kl": 0.02}


@torch.no_grad()
def test_saelens_own_workflow_runs_on_the_export_and_reproduces_mlsae_test(trained, tmp_path):
    """SAELens's own loader, model loader, activation store and `run_evals`, fed the metadata of
    the export as a new user would, on the tokens `mlsae test` reads: the same FVU, MSE and L0
    at every layer (SAELens's MSE sums over d, ours averages), dCE and KL as close as their
    definitions allow (REL)."""
    from datasets import Dataset
    from sae_lens import SAE, ActivationsStore
    from sae_lens.evals import EvalConfig as LensEvalConfig
    from sae_lens.evals import run_evals
    from sae_lens.load_model import load_model
    from sae_lens.training.activation_scaler import ActivationScaler

    out, n_tokens = tmp_path / "saelens", 256
    assert (
        main(["export", "--format", "saelens", "--repo_id", str(trained), "--out", str(out)]) == 0
    )
    assert main(["test", "--repo_id", str(trained), "--max_tokens", str(n_tokens), "--device",
                 "cpu", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    ours = {
        r["layer"]: r for r in pq.read_table(tmp_path / "eval" / "test_metrics.parquet").to_pylist()
    }
    chunks = load_for_test(trained, EvalConfig(max_tokens=n_tokens, device="cpu")).chunks
    rows = chunks.tokens.shape[0]
    assert rows * chunks.tokens.shape[1] == n_tokens  # whole rows: no padding to tell apart
    held_out = Dataset.from_dict({"tokens": chunks.tokens.tolist()})
    lens_cfg = LensEvalConfig(batch_size_prompts=rows, n_eval_reconstruction_batches=1,
                              n_eval_sparsity_variance_batches=1, compute_kl=True,
                              compute_ce_loss=True, compute_variance_metrics=True,
                              compute_sparsity_metrics=True)  # fmt: skip
    model = None
    for layer in (0, 1, 2):
        sae = SAE.load_from_disk(str(out / f"model.layers.{layer}"))
        meta = sae.cfg.metadata
        model = model or load_model(meta.model_class_name, meta.model_name, device="cpu")
        # the recorded dataset opens as SAELens reads it (text, tokenized by SAELens itself)
        store = ActivationsStore.from_sae(model, sae, dataset=meta.dataset_path)
        assert store.get_batch_tokens(2).shape == (2, meta.context_size)
        # the held-out tokens `mlsae test` read, with the positions it skips (BOS/EOS/PAD)
        store = ActivationsStore.from_sae(model, sae, dataset=held_out, streaming=False)
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), lens_cfg,
                               exclude_special_tokens=sorted(chunks.special_ids))  # fmt: skip
        want, rq = ours[str(layer)], metrics["reconstruction_quality"]
        got = {
            "fvu": 1 - rq["explained_variance"],
            "mse": rq["mse"] / sae.cfg.d_in,
            "l0": metrics["sparsity"]["l0"],
            "dce": metrics["model_performance_preservation"]["ce_loss_with_sae"]
            - metrics["model_performance_preservation"]["ce_loss_without_sae"],
            "kl": metrics["model_behavior_preservation"]["kl_div_with_sae"],
        }
        for key, value in got.items():
            assert value == pytest.approx(want[key], rel=REL[key]), (layer, key, value, want[key])


def _sparsify_run(tmp_path: Path, model: Path, corpus: Path, hook: str = "layers.1", **cfg):
    """A sparsify SAE built and saved by sparsify's own code, its parameters moved off their
    initial values (biases included), with the run config sparsify's trainer writes beside it."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(32, SparseCoderConfig(k=4, num_latents=64, **cfg))
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path / "sparsify-run"
    coder.save_to_disk(run / hook)
    run_cfg = {"model": str(model), "dataset": str(corpus), "ctx_len": 16, "hookpoints": [hook]}
    (run / "config.json").write_text(json.dumps(run_cfg))
    return coder, run


@torch.no_grad()
def test_a_sparsify_sae_loads_through_ours_and_agrees(tiny_model_dir, corpus_dir, tmp_path):  # noqa: F811
    coder, run = _sparsify_run(tmp_path, tiny_model_dir, corpus_dir)
    ours = MLSAE.from_pretrained(run)
    assert ours.metadata["layers"] == [1] and ours.metadata["source_format"] == "sparsify"
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    enc = coder.encode(x)
    want = torch.zeros(50, 64).scatter_(-1, enc.top_indices, enc.top_acts)
    got, recons = _dense(ours, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recons, coder.decode(enc.top_acts, enc.top_indices))
    # evaluated as a single-layer SAE with our metrics, on the layer it was trained on
    assert main(["test", "--repo_id", str(run), "--max_tokens", "256", "--out",
                 str(tmp_path / "eval")]) == 0  # fmt: skip
    rows = pq.read_table(tmp_path / "eval" / "test_metrics.parquet").to_pylist()
    assert [r["layer"] for r in rows] == ["1", "avg"] and rows[0]["fvu"] > 0


@pytest.mark.parametrize(
    ("cfg", "hook", "why"),
    [
        ({"transcode": True}, "layers.1", "transcoder"),
        ({"skip_connection": True}, "layers.1", "skip connection"),
        ({}, "layers.1.mlp", "hook point 'layers.1.mlp' is not a block output"),
    ],
)
def test_what_sparsify_has_and_we_cannot_evaluate_is_refused(tmp_path, cfg, hook, why):
    _, run = _sparsify_run(tmp_path, tmp_path, tmp_path, hook=hook, **cfg)
    with pytest.raises(CheckpointError, match=why):
        MLSAE.from_pretrained(run / hook)


def test_a_directory_of_neither_format_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["export", "--format", "saelens", "--repo_id", str(tmp_path), "--out",
                 str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is missing: not an MLSAE checkpoint" in err[0], err


def test_saelens_own_sparsify_loader_transposes_w_dec(tmp_path):
    """SAELens's `sparsify_disk_loader` (6.54) transposes sparsify's W_dec, already
    [n_latents, d] as SAELens wants it, so a non-square SAE does not load there (and it sets
    apply_b_dec_to_input false when normalize_decoder is on, though sparsify subtracts b_dec).
    We read sparsify's layout ourselves (docs/interop.md); should SAELens fix its loader, this
    test fails and that paragraph of the docs goes."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    _, run = _sparsify_run(tmp_path, tmp_path, tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch for W_dec"):
        SAE.load_from_disk(str(run / "layers.1"), converter=sparsify_disk_loader)
    assert MLSAE.from_pretrained(run / "layers.1").decoder.weight.shape == (32, 64)
