"""The tuned lens: it beats the logit lens, inverts exactly, round-trips its files, reads the
tuned-lens package's layout, refuses what does not fit, and `mlsae lens train` works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlsae_core import atomic
from mlsae_core.cli import main
from mlsae_core.config import LensConfig
from mlsae_core.lens import (
    WEIGHTS_NAME,
    LensError,
    TunedLens,
    lens_kl,
    train_lens,
)
from tests.tiny import tiny_transformer, write_smoke_inputs

N_LAYERS, D = 4, 32


@pytest.fixture(scope="module")
def tt():
    return tiny_transformer("llama", n_layers=N_LAYERS, d=D)


@pytest.fixture(scope="module")
def data(tt):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, tt.vocab_size, (16, 32), generator=g)
    masks = torch.ones_like(tokens, dtype=torch.bool)
    masks[:, 0] = False  # a position that must not count
    return tokens, masks


@pytest.fixture(scope="module")
def trained(tt, data):
    tokens, masks = data
    cfg = LensConfig(steps=60, batch_size=128, lr=1e-2, head_dtype="float32", device="cpu")
    return train_lens(tt, tokens[:12], masks[:12], cfg, progress=False)


def random_lens(n_layers: int = N_LAYERS, d: int = D, seed: int = 0) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(n_layers, d, "tiny-llama")
    with torch.no_grad():
        lens.weight.copy_(torch.randn(n_layers, d, d, generator=g) * 0.3 / d**0.5)
        lens.bias.copy_(torch.randn(n_layers, d, generator=g))
    return lens


def test_tuned_lens_beats_logit_lens(tt, data, trained):
    tokens, masks = data
    rows = lens_kl(tt, trained, tokens[12:], masks[12:])
    assert [r["layer"] for r in rows] == list(range(N_LAYERS))
    for r in rows[:-1]:
        assert r["kl_tuned_lens"] < 0.5 * r["kl_logit_lens"], r
    assert abs(rows[-1]["kl_logit_lens"]) < 1e-12 and abs(rows[-1]["kl_tuned_lens"]) < 1e-12
    assert torch.count_nonzero(trained.weight[-1]) == 0  # the last layer stays the identity
    again = train_lens(tt, tokens[:12], masks[:12], LensConfig(**trained.settings), progress=False)
    assert again.fingerprint() == trained.fingerprint()  # deterministic given the seed


def test_head_logits_is_the_models_head(tt):
    x = torch.randn(5, D)
    assert torch.allclose(tt.head_logits(x), tt.logits(x), atol=1e-6)


def test_inverse_is_exact_in_float64():
    lens = random_lens()
    x = torch.randn(N_LAYERS, 3, 7, D, dtype=torch.float64)
    assert (lens.inverse(lens.transform(x)) - x).abs().max() < 1e-10
    assert (lens.transform(lens.inverse(x)) - x).abs().max() < 1e-10
    some = [2, 0]
    assert (lens.inverse(lens.transform(x[:2], some), some) - x[:2]).abs().max() < 1e-10
    before = lens.inverse(x)
    with torch.no_grad():
        lens.weight.mul_(2.0)  # the cached inverses must follow the weights
    assert (lens.inverse(lens.transform(x)) - x).abs().max() < 1e-10
    assert not torch.allclose(before, lens.inverse(x))


def test_save_load_round_trip_and_manifest(tmp_path):
    lens = random_lens()
    lens.kl_table = [{"layer": 0, "kl_logit_lens": 1.0, "kl_tuned_lens": 0.5}]
    lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens", n_layers=N_LAYERS, d_model=D)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.fingerprint() == lens.fingerprint() and back.kl_table == lens.kl_table
    assert set(atomic.read_manifest(tmp_path / "lens")) == {WEIGHTS_NAME, "config.json"}
    weights = tmp_path / "lens" / WEIGHTS_NAME
    good = weights.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LensError, match=f"{weights} does not match the sha256"):
        TunedLens.load(tmp_path / "lens")
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(LensError, match=f"{weights} does not match the sha256"):
        TunedLens.load(tmp_path / "lens")
    weights.write_bytes(good)
    assert torch.equal(TunedLens.load(tmp_path / "lens").weight, lens.weight)
    atomic.record(tmp_path / "lens", [], forget=[WEIGHTS_NAME])  # its manifest entry deleted
    with pytest.raises(LensError, match=f"{weights} is not recorded"):
        TunedLens.load(tmp_path / "lens")
    with pytest.raises(LensError, match="does not exist"):
        TunedLens.load(tmp_path / "nowhere")
    weights.unlink()
    with pytest.raises(LensError, match=f"{WEIGHTS_NAME} is missing"):
        TunedLens.load(tmp_path / "lens")


class NotATensor:
    """An arbitrary pickled object: what weights_only=True must refuse to unpickle."""


def write_package_lens(directory: Path, state: object, n_hidden: int = N_LAYERS) -> None:
    directory.mkdir()
    config = {
        "base_model_name_or_path": "tiny-llama",
        "d_model": D,
        "num_hidden_layers": n_hidden,
        "bias": True,
        "lens_type": "linear_tuned_lens",
    }
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "params.pt")


def test_tuned_lens_package_layout(tmp_path):
    translators = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(N_LAYERS))
    write_package_lens(tmp_path / "pkg", translators.state_dict())
    lens = TunedLens.load(tmp_path / "pkg", n_layers=N_LAYERS, d_model=D)
    for layer in range(N_LAYERS - 1):  # our layer l = hidden_states[l + 1] = translator l + 1
        assert torch.equal(lens.weight[layer], translators[layer + 1].weight.detach())
        assert torch.equal(lens.bias[layer], translators[layer + 1].bias.detach())
    assert torch.count_nonzero(lens.weight[-1]) == 0 and torch.count_nonzero(lens.bias[-1]) == 0
    assert lens.model_name == "tiny-llama"

    write_package_lens(tmp_path / "evil", {"0.weight": NotATensor()})
    with pytest.raises(LensError, match="weights_only"):
        TunedLens.load(tmp_path / "evil")


def test_tfm_state_dict_maps_index_to_layer():
    g = torch.Generator().manual_seed(1)
    state = {f"lens.layer_translators.{i}.weight": torch.randn(D, D, generator=g) for i in range(3)}
    state |= {f"lens.layer_translators.{i}.bias": torch.randn(D, generator=g) for i in range(3)}
    state["autoencoder.encoder.weight"] = torch.zeros(2, D)  # other prefixes are ignored
    lens = TunedLens.from_state_dict(state, "lens.layer_translators.", 0, n_layers=N_LAYERS)
    for i in range(3):
        assert torch.equal(lens.weight[i], state[f"lens.layer_translators.{i}.weight"])
    assert torch.count_nonzero(lens.weight[3]) == 0
    with pytest.raises(LensError, match="lacks"):
        TunedLens.from_state_dict(state, "lens.layer_translators.", 0, n_layers=N_LAYERS + 1)


def test_mismatched_shape_is_refused(tmp_path, tt):
    random_lens(N_LAYERS + 1, D).save(tmp_path / "a")
    with pytest.raises(LensError, match=r"trained for 5 layers of width 32; .* 4 layers of width"):
        TunedLens.load(tmp_path / "a", n_layers=N_LAYERS, d_model=D)
    with pytest.raises(LensError, match="width 16"):
        TunedLens.load(tmp_path / "a", n_layers=N_LAYERS + 1, d_model=16)
    with pytest.raises(LensError, match="trained for 5 layers"):
        lens_kl(tt, random_lens(N_LAYERS + 1, D), torch.zeros(1, 4, dtype=torch.long),
                torch.ones(1, 4, dtype=torch.bool))  # fmt: skip


def test_lens_kl_matches_an_independent_float64_computation(tt, data):
    tokens, masks = data
    lens = random_lens()
    rows = lens_kl(tt, lens, tokens[12:], masks[12:])
    model = tt.model
    captured = []  # HF's last hidden state is after the final norm: hook the last block
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model(input_ids=tokens[12:], output_hidden_states=True, use_cache=False)
    hook.remove()
    blocks = [*out.hidden_states[1:-1], captured[0]]  # block l's output, l = 0..L-1
    mask = masks[12:]
    logp = torch.log_softmax(out.logits.double(), -1)[mask]
    norm = model.model.norm
    model64 = {
        "eps": norm.variance_epsilon,
        "g": norm.weight.double(),
        "w": model.lm_head.weight.double(),
    }

    def head64(h):
        var = h.pow(2).mean(-1, keepdim=True)
        normed = h * torch.rsqrt(var + model64["eps"]) * model64["g"]
        return torch.log_softmax(normed @ model64["w"].T, -1)

    for layer in range(N_LAYERS):
        h = blocks[layer].double()[mask]
        a, b = lens.weight[layer].double(), lens.bias[layer].double()
        for key, x in (("kl_logit_lens", h), ("kl_tuned_lens", h + h @ a.T + b)):
            kl = (logp.exp() * (logp - head64(x))).sum(-1).mean().item()
            assert rows[layer][key] == pytest.approx(kl, rel=1e-5, abs=1e-7), (layer, key)


def test_cli_lens_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLSAE_DATA_DIR", str(write_smoke_inputs(tmp_path / "data")))
    out = tmp_path / "lens"
    args = ["lens", "train", "--model_name", "tiny-llama", "--dataset", "tiny-text",
            "--max_length", "64", "--max_tokens", "1024", "--steps", "8", "--batch_size", "128",
            "--eval_tokens", "256", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kl_tuned_lens" in printed and "saved to" in printed
    lens = TunedLens.load(out, n_layers=4, d_model=32)
    config = json.loads((out / "config.json").read_text())
    assert [r["layer"] for r in config["kl"]] == [0, 1, 2, 3]
    assert config["settings"]["steps"] == 8 and config["settings"]["data"]["dataset"] == "tiny-text"
    assert lens.model_name == "tiny-llama"
    assert main([*args[:-1], str(tmp_path / "bad"), "--steps", "0"]) == 2
