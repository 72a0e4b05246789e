"""The reference's `...-tfm` checkpoints: one model.safetensors with `autoencoder.*` and
`transformer.model.*` tensors, and a config.json of the training module's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from mlsae_core.cli import main
from mlsae_core.config import ConfigError, EvalConfig
from mlsae_core.runs import load_for_test
from mlsae_core.sae import MLSAE
from tests.test_cli import corpus_dir, tiny_model_dir  # noqa: F401 - fixtures
from tests.tiny import tiny_transformer

SETTINGS = {  # the original's Lightning hparams, unknown keys included
    "layers": None,
    "expansion_factor": 2,
    "k": 4,
    "auxk": 8,
    "auxk_coef": 1 / 32,
    "dead_tokens_threshold": 10_000_000,
    "dead_steps_threshold": None,
    "standardize": True,
    "skip_special_tokens": True,
    "lr": 1e-4,
    "tuned_lens": False,
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:  # noqa: F811 - test_cli's tiny Llama directory
    return tiny_model_dir


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> Path:  # noqa: F811 - test_cli's 40 small documents
    return corpus_dir


def write_tfm(out: Path, model_dir: Path, extra: dict | None = None) -> tuple[MLSAE, dict]:
    """A tfm checkpoint whose transformer weights differ from model_dir's (perturbed)."""
    torch.manual_seed(1)
    sae = MLSAE(n_inputs=32, n_latents=64, k=4, auxk=8)
    base = tiny_transformer("llama", n_layers=3, d=32).model.state_dict()
    state = {k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in base.items()}
    tensors = {f"autoencoder.{k}": v for k, v in sae.weights_dict().items()}
    tensors |= {f"transformer.model.{k}": v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({**tensors, **(extra or {})}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**SETTINGS, "model_name": str(model_dir)}))
    return sae, state


def test_from_pretrained_reads_the_autoencoder(model_dir, tmp_path):
    sae, _ = write_tfm(tmp_path / "tfm", model_dir)
    got = MLSAE.from_pretrained(tmp_path / "tfm")
    assert (got.n_inputs, got.n_latents, got.k, got.auxk) == (32, 64, 4, 8)
    assert got.standardize is True and got.dead_tokens_threshold == 10_000_000
    for name, want in sae.weights_dict().items():
        assert torch.equal(got.weights_dict()[name], want), name
    assert got.metadata["model_name"] == str(model_dir)
    assert got.metadata["n_model_layers"] == 3  # layers=None: counted from the tensors


def test_load_for_test_uses_the_files_transformer(model_dir, corpus, tmp_path):
    _, state = write_tfm(tmp_path / "tfm", model_dir)
    cfg = EvalConfig(max_tokens=128, device="cpu")
    with pytest.raises(ConfigError, match="--dataset"):
        load_for_test(tmp_path / "tfm", cfg)
    setup = load_for_test(tmp_path / "tfm", cfg, dataset=str(corpus))
    got = setup.transformer.model.state_dict()
    assert set(got) == set(state)
    for name, want in state.items():
        assert torch.equal(got[name], want), name
    on_disk = tiny_transformer("llama", n_layers=3, d=32).model.state_dict()
    assert not torch.equal(got["model.embed_tokens.weight"], on_disk["model.embed_tokens.weight"])
    assert setup.layers == [0, 1, 2] and setup.chunks.n_tokens > 0


def test_cli_test_on_a_tfm_checkpoint(model_dir, corpus, tmp_path):
    write_tfm(tmp_path / "tfm", model_dir)
    argv = ["test", "--repo_id", str(tmp_path / "tfm"), "--dataset", str(corpus)]
    assert main([*argv, "--max_tokens", "128", "--device", "cpu"]) == 0
    table = pq.read_table(tmp_path / "tfm" / "test_metrics.parquet").to_pylist()
    assert table and table[0]["layers"] == "0-2" and table[0]["expansion_factor"] == 2


def test_a_tuned_lens_checkpoint_loads_its_lens(model_dir, corpus, tmp_path):
    """The original applied lens.layer_translators.<l> to block l's output (index offset 0)."""
    g = torch.Generator().manual_seed(3)
    lens = {}
    for i in range(3):
        lens[f"lens.layer_translators.{i}.weight"] = 0.05 * torch.randn(32, 32, generator=g)
        lens[f"lens.layer_translators.{i}.bias"] = 0.05 * torch.randn(32, generator=g)
    lens["lens.unembed.unembedding.weight"] = torch.zeros(2, 32)  # other lens.* tensors: ignored
    write_tfm(tmp_path / "tfm", model_dir, extra=lens)
    cfg = json.loads((tmp_path / "tfm" / "config.json").read_text())
    (tmp_path / "tfm" / "config.json").write_text(json.dumps({**cfg, "tuned_lens": True}))
    assert MLSAE.from_pretrained(tmp_path / "tfm").metadata["tuned_lens"] is True
    setup = load_for_test(tmp_path / "tfm", EvalConfig(max_tokens=128, device="cpu"),
                          dataset=str(corpus))  # fmt: skip
    assert setup.lens is not None
    for i in range(3):
        assert torch.equal(setup.lens.weight[i], lens[f"lens.layer_translators.{i}.weight"])
        assert torch.equal(setup.lens.bias[i], lens[f"lens.layer_translators.{i}.bias"])
    argv = ["test", "--repo_id", str(tmp_path / "tfm"), "--dataset", str(corpus)]
    assert main([*argv, "--max_tokens", "128", "--device", "cpu"]) == 0
    table = pq.read_table(tmp_path / "tfm" / "test_metrics.parquet").to_pylist()
    assert table and all(r["tuned_lens"] for r in table)


def test_a_wrong_transformer_is_refused_by_name(model_dir, tmp_path):
    write_tfm(tmp_path / "tfm", model_dir, extra={"transformer.model.stray": torch.zeros(2)})
    with pytest.raises(ValueError, match="stray"):
        load_for_test(tmp_path / "tfm", EvalConfig(max_tokens=128, device="cpu"), dataset="x")


def test_a_tied_weight_saved_once_loads(tmp_path):
    """safetensors keeps one name of a tied weight; the other is the same parameter."""
    from mlsae_core.transformer import Transformer

    t = tiny_transformer("gpt2", n_layers=2, d=32)
    t.model.save_pretrained(tmp_path / "gpt2")
    t.tokenizer.save_pretrained(tmp_path / "gpt2")
    state = {k: v + 0.01 for k, v in t.model.state_dict().items() if k != "lm_head.weight"}
    got = Transformer.from_state_dict(str(tmp_path / "gpt2"), state)
    assert torch.equal(got.unembed.weight, state["transformer.wte.weight"])


def test_a_loaded_tfm_autoencoder_saves_as_a_plain_checkpoint(model_dir, tmp_path):
    sae, _ = write_tfm(tmp_path / "tfm", model_dir)
    MLSAE.from_pretrained(tmp_path / "tfm").save_pretrained(tmp_path / "plain")
    got = MLSAE.from_pretrained(tmp_path / "plain")
    assert torch.equal(got.encoder.weight, sae.encoder.weight)


def test_explore_uses_the_files_transformer_and_lens(model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import load_app

    g = torch.Generator().manual_seed(4)
    lens = {
        f"lens.layer_translators.{i}.weight": 0.05 * torch.randn(32, 32, generator=g)
        for i in range(3)
    }
    _, state = write_tfm(tmp_path / "tfm", model_dir, extra=lens)
    app = load_app(str(tmp_path / "tfm"))
    explorer = app.state.explorer
    got = explorer.transformer.model.state_dict()
    assert all(torch.equal(got[name], want) for name, want in state.items())
    assert explorer.lens is not None
    assert torch.equal(explorer.lens.weight[1], lens["lens.layer_translators.1.weight"])
    with TestClient(app) as c:
        assert c.get("/api/info").json()["sae"]["tuned_lens"] is True
        prompt = "the quick brown fox jumps over the lazy dog"
        assert c.post("/api/prompt", json={"prompt": prompt}).status_code == 200
        # a latent's output-token effects: one per layer, through the lens's inverse
        page = c.get("/api/latent/0").json()
        assert [e["layer"] for e in page["output_effects"]] == explorer.layers
