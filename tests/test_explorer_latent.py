"""The explorer's latent pages and the dashboard export against independent computations.

A tiny MLSAE is trained and analysed by the CLI (`trained_run`, shared with the browser test),
so its run directory holds the tables the page reads; the same checkpoint without them makes
the page compute everything from its held-out sample. Each section is checked against a
brute-force computation over the same held-out tokens: the layer distribution against the
tables, densities and the histogram against counts over dense activations, the examples
against a sort, the neighbours against float64 cosines, the output-token effects against the
unembedding of the hand-normalised decoder column in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from mlsae_core.cli import main
from mlsae_core.config import EvalConfig
from mlsae_core.data import held_out_split
from mlsae_core.explorer.latent import BINS, N_MAX_EXAMPLES, QUANTILES, export_dashboard
from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.server import create_app, load_app
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer
from tests.test_cli import train_args
from tests.tiny import tiny_transformer

SAMPLE = 256  # held-out tokens: the analysis' and the explorer's sample alike
WORDS = (
    "When Mary and John went to the store , John gave a drink to Mary . The quick brown fox "
    "jumps over the lazy dog . A cat sat on the mat and the dog sat on the log ."
).split()


def trained_run(root: Path) -> Path:
    """root/model (tiny Llama), root/corpus (40 documents), root/sae: an MLSAE trained and
    analysed by the CLI over SAMPLE held-out tokens (every per-run table beside it)."""
    model, corpus, ck = root / "model", root / "corpus", root / "sae"
    t = tiny_transformer("llama", n_layers=3, d=32)
    t.model.save_pretrained(model)
    t.tokenizer.save_pretrained(model)
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        idx = torch.randint(0, len(WORDS), (60,), generator=g).tolist()
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(WORDS[j] for j in idx))
    assert main(train_args(model, corpus, ck)) == 0
    args = ["--repo_id", str(ck), "--max_tokens", str(SAMPLE), "--n_examples", "4"]
    assert main(["analyse", *args, "--splice_max_tokens", "32"]) == 0
    return ck


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("latent"))


@pytest.fixture(scope="module")
def loaded(run):
    sae = MLSAE.from_pretrained(run)
    return sae, Transformer.load(sae.metadata["model_name"])


@pytest.fixture(scope="module")
def dense(loaded):
    """The brute force: [L, R, P, n] latent values on the held-out tokens, and the mask."""
    sae, tf = loaded
    layers = sae.metadata["layers"]
    chunks = held_out_split(sae.metadata, tf, SAMPLE)
    mask = chunks.mask()
    with torch.no_grad():
        topk = sae(tf.activations(chunks.tokens, layers).float()).topk  # [L, R, P, k]
    out = torch.zeros(*topk.values.shape[:3], sae.n_latents)
    out.scatter_(-1, topk.indices, topk.values.float())
    return chunks, mask, out * mask[None, :, :, None]


def _table(run: Path, name: str) -> list[dict]:
    return pq.read_table(run / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def live(run) -> int:
    """The latent that fires most often."""
    return max(_table(run, "latent_dists"), key=lambda r: r["count"])["latent"]


@pytest.fixture(scope="module")
def with_tables(run):
    with TestClient(load_app(str(run), ExplorerSettings(latent_tokens=SAMPLE))) as c:
        yield c


@pytest.fixture(scope="module")
def without_tables(loaded):
    """The same checkpoint with no run directory and no examples: all from the sample."""
    sae, tf = loaded
    app = create_app(sae, tf, settings=ExplorerSettings(latent_tokens=SAMPLE))
    with TestClient(app) as c:
        yield c


def test_layer_distribution_is_the_tables(run, with_tables, live) -> None:
    page = with_tables.get(f"/api/latent/{live}").json()
    row = next(r for r in _table(run, "latent_dists") if r["latent"] == live)
    assert page["layer_mean"] == row["layer_mean"] and page["layer_std"] == row["layer_std"]
    assert page["live"] is True and page["dists_source"].endswith("latent_layer_dists.parquet")
    rows = {r["layer"]: r for r in _table(run, "latent_layer_dists") if r["latent"] == live}
    (n_tokens,) = [r["n_tokens"] for r in _table(run, "dists_summary")]
    assert page["n_tokens"] == n_tokens
    for got in page["per_layer"]:
        want = rows.get(got["layer"], {"p": 0.0, "count": 0})
        assert got["p"] == pytest.approx(want["p"], abs=1e-15)
        assert got["count"] == want["count"] and got["density"] == want["count"] / n_tokens
    examples = [g["examples"] for g in page["max_examples"]]
    table = [r for r in _table(run, "max_examples") if r["latent"] == live]
    for layer, got in zip(page["layers"], examples, strict=True):
        want = sorted((r for r in table if r["layer"] == layer), key=lambda r: r["rank"])
        assert [e["activation"] for e in got] == pytest.approx([r["activation"] for r in want])
        assert [e["context_tokens"] for e in got] == [r["context_tokens"] for r in want]


def test_the_sample_gives_the_same_distribution(with_tables, without_tables, live) -> None:
    """Over the same held-out tokens, computing gives what the tables say."""
    a = with_tables.get(f"/api/latent/{live}").json()
    b = without_tables.get(f"/api/latent/{live}").json()
    n = a["n_tokens"]  # the non-special ones of the SAMPLE tokens
    assert b["dists_source"] == f"held-out sample ({n} tokens)" == b["examples_source"]
    assert b["n_tokens"] == n == b["sample_tokens"] and SAMPLE - 10 < n <= SAMPLE
    assert b["layer_mean"] == pytest.approx(a["layer_mean"], abs=1e-12)
    assert b["layer_std"] == pytest.approx(a["layer_std"], abs=1e-12)
    for x, y in zip(a["per_layer"], b["per_layer"], strict=True):
        assert x["count"] == y["count"] and y["p"] == pytest.approx(x["p"], abs=1e-12)


def test_density_histogram_and_examples_by_brute_force(loaded, dense, without_tables, live) -> None:
    sae, _ = loaded
    chunks, mask, acts = dense
    page = without_tables.get(f"/api/latent/{live}").json()
    a = acts[..., live]  # [L, R, P]
    fired = a > sae.dead_threshold
    n_valid = int(mask.sum())
    assert [r["density"] for r in page["per_layer"]] == pytest.approx(
        (fired.sum((1, 2)) / n_valid).tolist()
    )
    h = page["histogram"]
    top = float(a[fired].max())
    assert h["edges"] == pytest.approx(np.linspace(0, top, BINS + 1).tolist())
    for li in range(len(page["layers"])):
        want, _ = np.histogram(a[li][fired[li]].numpy(), bins=BINS, range=(0.0, top))
        assert sum(h["counts"][li]) == int(fired[li].sum())
        assert np.abs(np.array(h["counts"][li]) - want).sum() <= 2  # edge rounding only
    n_pos, c = chunks.tokens.shape[1], EvalConfig.n_context
    for li, group in enumerate(page["max_examples"]):
        flat = a[li].flatten()
        want = sorted(flat[flat > sae.dead_threshold].tolist(), reverse=True)[:N_MAX_EXAMPLES]
        got = group["examples"]
        assert [e["activation"] for e in got] == pytest.approx(want)
        for e in got:
            r, pos = e["row"], e["pos"]
            assert flat[r * n_pos + pos] == pytest.approx(e["activation"])
            assert e["token_id"] == int(chunks.tokens[r, pos])
            lo = max(0, pos - c)
            assert e["centre"] == pos - lo
            assert e["context_activations"] == pytest.approx(a[li, r, lo : pos + c + 1].tolist())
    values = sorted(a[fired].tolist())
    assert [q["quantile"] for q in page["quantile_examples"]] == list(QUANTILES)
    for q in page["quantile_examples"]:
        assert q["activation"] == pytest.approx(values[round(q["quantile"] * (len(values) - 1))])
        for e in q["examples"]:
            assert e["activation"] == pytest.approx(values[len(values) - 1 - e["rank"]])


def test_neighbours_are_the_largest_decoder_cosines(run, loaded, with_tables, live) -> None:
    sae, _ = loaded
    w = sae.decoder.weight.detach().double()
    cos = (w[:, live] @ w) / (w.norm(dim=0) * w[:, live].norm())
    cos[live] = -math.inf
    want = torch.topk(cos, 10)
    got = with_tables.get(f"/api/latent/{live}").json()["neighbours"]
    assert [n["latent"] for n in got] == want.indices.tolist()
    assert [n["cosine"] for n in got] == pytest.approx(want.values.tolist(), abs=1e-6)
    dists = {r["latent"]: r["layer_mean"] for r in _table(run, "latent_dists")}
    for n in got:
        want = dists[n["latent"]]
        assert n["layer_mean"] == want or (n["layer_mean"] is None and math.isnan(want))


def _unembed(tf, normed: torch.Tensor) -> torch.Tensor:
    """W_U (the normed direction) in float64 (the head's bias cancels in N(d) - N(0))."""
    return tf.unembed.weight.detach().double() @ normed


def test_output_effects_through_the_final_norm(loaded, with_tables, live) -> None:
    sae, tf = loaded
    column = sae.decoder.weight[:, live].detach().double()
    norm = tf.final_norm  # Llama's RMSNorm, by hand
    eps = float(norm.variance_epsilon)
    normed = norm.weight.detach().double() * column / torch.sqrt(column.pow(2).mean() + eps)
    effect = _unembed(tf, normed)
    (got,) = with_tables.get(f"/api/latent/{live}").json()["output_effects"]
    assert got["layer"] is None
    up, down = torch.topk(effect, 10), torch.topk(-effect, 10)
    assert [t["token_id"] for t in got["positive"]] == up.indices.tolist()
    assert [t["delta"] for t in got["positive"]] == pytest.approx(up.values.tolist(), rel=1e-4)
    assert [t["token_id"] for t in got["negative"]] == down.indices.tolist()
    assert [t["delta"] for t in got["negative"]] == pytest.approx((-down.values).tolist(), rel=1e-4)


def test_output_effects_with_a_linear_final_norm(loaded, live) -> None:
    """With a final norm that is linear (x -> g * x), the effect is exactly W_U (g * d)."""
    sae, _ = loaded
    tf = Transformer.load(sae.metadata["model_name"])
    g = torch.linspace(0.5, 1.5, tf.d_model)

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * g.to(x.dtype)

    tf.final_norm = Scale()
    column = sae.decoder.weight[:, live].detach().double()
    effect = _unembed(tf, g.double() * column)
    with TestClient(create_app(sae, tf)) as c:
        (got,) = c.get(f"/api/latent/{live}").json()["output_effects"]
    up = torch.topk(effect, 10)
    assert [t["token_id"] for t in got["positive"]] == up.indices.tolist()
    assert [t["delta"] for t in got["positive"]] == pytest.approx(up.values.tolist(), rel=1e-5)


def test_out_of_range_is_404_with_the_range(with_tables) -> None:
    for bad in (64, 10**6, -1):
        r = with_tables.get(f"/api/latent/{bad}")
        assert r.status_code == 404
        assert r.json() == {
            "detail": f"latent={bad} is out of range: the MLSAE has 64 latents (0..63)"
        }
    assert with_tables.get("/api/latent/abc").status_code == 422
    page = with_tables.get("/latent/3")
    assert page.status_code == 200 and 'src="/static/latent.js"' in page.text
    spec = with_tables.get("/openapi.json").json()
    op = spec["paths"]["/api/latent/{latent}"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LatentOut"
    }
    assert "404" in op["responses"]


def test_without_a_dataset_the_page_says_why(loaded) -> None:
    sae, tf = loaded
    bare = MLSAE(sae.n_inputs, sae.n_latents, sae.k, auxk=None, metadata={"layers": [0, 1, 2]})
    bare.load_state_dict(sae.state_dict())
    with TestClient(create_app(bare, tf)) as c:
        page = c.get("/api/latent/5").json()
    assert page["sample_tokens"] == 0 and page["histogram"] is None
    assert "does not record its dataset" in page["message"]
    assert page["per_layer"] == [] and page["max_examples"] == []
    assert len(page["neighbours"]) == 10 and page["output_effects"]


def test_export_writes_the_api_json(run, with_tables, tmp_path) -> None:
    out = tmp_path / "dash"
    paths = export_dashboard(run, out, ExplorerSettings(latent_tokens=SAMPLE))
    index = json.loads((out / "index.json").read_text())
    live = [r["latent"] for r in _table(run, "latent_dists") if r["live"]]
    assert paths[0] == out / "index.json" and len(paths) == 1 + len(live)
    assert [e["latent"] for e in index["latents"]] == live
    assert index["n_latents"] == 64 and index["layers"] == [0, 1, 2]
    for entry in index["latents"][:3]:
        page = json.loads((out / entry["file"]).read_text())
        assert page == with_tables.get(f"/api/latent/{entry['latent']}").json()
    # as users run it
    from mlsae_core.cli import main

    cli = tmp_path / "cli"
    assert main(["export", "--format", "dashboard", "--repo_id", str(run), "--out", str(cli)]) == 0
    assert json.loads((cli / "index.json").read_text())["latents"] == index["latents"]
