"""The explorer's JSON API against direct computations on a tiny transformer and tiny MLSAE.

Also holds the helpers the browser and load tests share (`build_checkpoint`, `free_port`,
`serve_in_thread`): a tiny Llama saved as a model directory, a random MLSAE checkpoint whose
config names that directory as its model, and a max_examples Parquet made by the real
collector (`MaxExamples` + `tables.max_examples_table`, the documented schema).
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mlsae_core import atomic
from mlsae_core.analysis import tables
from mlsae_core.analysis.examples import MaxExamples, sae_row_encoder
from mlsae_core.explorer.cache import ByteLRU
from mlsae_core.explorer.examples import ExamplesStore
from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.prompt import prompt_metrics
from mlsae_core.layout import RunLayout
from mlsae_core.losses import fvu_per_layer
from mlsae_core.sae import MLSAE
from tests.tiny import dense_latents, splice_logits, tiny_transformer

LAYERS = [0, 1, 2]
N_LATENTS, K = 64, 4
PROMPT = "When Mary and John went to the store , John gave a drink to"
TEXTS = [
    "When Mary and John went to the store , John gave a drink to Mary .",
    "The quick brown fox jumps over the lazy dog .",
    "A cat sat on the mat and the dog sat on the log .",
    "Residual streams carry features from one layer to the next .",
]


# ----- shared helpers ----------------------------------------------------------------------
def tiny_pair(seed: int = 1) -> tuple[MLSAE, object]:
    tf = tiny_transformer("llama", n_layers=3, d=32)
    torch.manual_seed(seed)
    sae = MLSAE(
        32,
        N_LATENTS,
        K,
        auxk=None,
        metadata={"model_name": "tiny", "layers": LAYERS, "expansion_factor": 2},
    )
    return sae, tf


def examples_table(sae: MLSAE, tf, n_examples: int = 4, n_context: int = 2):
    """The max_examples table of the tiny pair over TEXTS, via the real collector."""
    rows = [tf.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), 2, dtype=torch.long)  # EOS-padded
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    masks = tokens != 2
    encode = sae_row_encoder(tf, sae, tokens, LAYERS, masks)
    topk = encode(torch.arange(len(rows)))  # [L, R, P, k]
    coll = MaxExamples(N_LATENTS, LAYERS, n_examples=n_examples, n_context=n_context)
    r_idx = torch.arange(len(rows)).repeat_interleave(width)
    p_idx = torch.arange(width).repeat(len(rows))
    coll.add(topk.values.flatten(1, 2), topk.indices.flatten(1, 2), r_idx, p_idx, width)
    result = coll.result(tokens, tf.tokenizer, encode_rows=encode)
    run_id = {
        "model": "tiny",
        "expansion_factor": 2,
        "k": K,
        "layers": "0-2",
        "tuned_lens": False,
        "seed": 0,
    }
    return tables.max_examples_table(result, run_id)


def examples_file(ckpt: Path) -> Path:
    """Where every writer puts a run's max_examples table, and where the explorer looks."""
    return RunLayout(ckpt).table("max_examples")


def build_checkpoint(root: Path, with_examples: bool = True) -> Path:
    """root/model (tiny Llama + tokenizer), root/ckpt (MLSAE naming it), examples beside."""
    sae, tf = tiny_pair()
    model_dir = root / "model"
    tf.model.save_pretrained(model_dir, safe_serialization=True)
    tf.tokenizer.save_pretrained(model_dir)
    sae.metadata["model_name"] = str(model_dir)
    ckpt = root / "ckpt"
    sae.save_pretrained(ckpt)
    if with_examples:
        atomic.write_parquet(examples_file(ckpt), examples_table(sae, tf))
    return ckpt


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ----- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def table(pair):
    sae, tf = pair
    return examples_table(sae, tf)


@pytest.fixture(scope="module")
def client(pair, table):
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import create_app

    sae, tf = pair
    app = create_app(sae, tf, examples_table=table, settings=ExplorerSettings(max_prompt_tokens=40))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def bare_client(pair):
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import create_app

    sae, tf = pair
    with TestClient(create_app(sae, tf, repo_id="runs/x"), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def direct(pair):
    """The prompt's tokens, activations [L, P, d] and the SAE's output, computed directly."""
    sae, tf = pair
    ids = tf.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    acts = tf.activations(tokens, LAYERS)[:, 0].float()  # [L, P, d]
    with torch.no_grad():
        out = sae(acts)
    dense = dense_latents(out.topk, sae.n_latents).double()  # [L, P, n]
    return ids, tokens, acts, out, dense


def post(c, path: str, **body):
    return c.post(path, json=body)


# ----- info, page, schema --------------------------------------------------------------------
def test_info(client, bare_client) -> None:
    info = client.get("/api/info").json()
    assert info["sae"]["layers"] == LAYERS and info["sae"]["n_latents"] == N_LATENTS
    assert info["sae"]["k"] == K and info["transformer"]["n_layers"] == 3
    assert info["examples"]["available"] and info["examples"]["rows"] > 0
    assert info["limits"]["max_prompt_tokens"] == 40
    assert info["cache"]["max_entries"] >= 1
    bare = bare_client.get("/api/info").json()
    assert not bare["examples"]["available"]
    assert (
        bare["examples"]["message"] == "no examples computed; run mlsae examples --repo_id runs/x"
    )


def test_page_static_and_openapi(client) -> None:
    for path in ("/", "/prompt/When%20Mary", "/prompt/a%2Fb%3Fc?layer=1&latent=3"):
        r = client.get(path)
        assert r.status_code == 200 and "MLSAE explorer" in r.text, path
        assert '<script src="/static/app.js">' in r.text
    assert "function renderHeatmap" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200
    assert "cdn" not in client.get("/").text.lower()
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/api/info",
        "/api/prompt",
        "/api/heatmap",
        "/api/activations",
        "/api/histograms",
        "/api/examples",
        "/api/logits",
    } <= paths
    assert "/prompt/{text}" not in paths and "/" not in paths


def test_no_file_can_be_named(client, tmp_path) -> None:
    for path in (
        "/static/../sae.py",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2F..%2Fpyproject.toml",
        "/prompt/..%2F..%2F..%2Fetc%2Fpasswd",
    ):
        r = client.get(path)
        assert "[project]" not in r.text and "root:" not in r.text and "import torch" not in r.text
        assert r.status_code in (200, 404), path
        if r.status_code == 200:
            assert "MLSAE explorer" in r.text  # the page, never a file


# ----- prompt + metrics ------------------------------------------------------------------------
def test_prompt_tokens_and_metrics(client, pair, direct) -> None:
    sae, tf = pair
    ids, _, acts, out, _ = direct
    r = post(client, "/api/prompt", prompt=PROMPT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == ids and body["n_tokens"] == len(ids)
    assert body["tokens"][:3] == ["When", "Mary", "and"]
    assert body["layers"] == LAYERS and not any(body["special"])
    fvu = fvu_per_layer(acts.double(), out.recons.double())  # [L]
    for m, want in zip(body["metrics"], fvu.tolist(), strict=True):
        assert m["fvu"] == pytest.approx(want, rel=1e-5)
    l0 = (out.topk.values > 1e-3).sum(-1).double().mean(-1)  # [L]
    assert [m["l0"] for m in body["metrics"]] == pytest.approx(l0.tolist())
    assert all(0 < m["l0"] <= K for m in body["metrics"])
    mse = (out.recons - acts).double().pow(2).mean((1, 2))
    assert [m["mse"] for m in body["metrics"]] == pytest.approx(mse.tolist(), rel=1e-5)
    assert body["metrics_mean"]["fvu"] == pytest.approx(fvu.mean().item(), rel=1e-5)


def test_special_tokens_are_excluded(client) -> None:
    body = post(client, "/api/prompt", prompt="Mary <eos> John").json()
    assert body["special"] == [False, True, False]
    hm = post(client, "/api/heatmap", prompt="Mary <eos> John", position=1).json()
    assert hm["latents"] == []
    single = post(client, "/api/prompt", prompt="Mary").json()
    assert single["metrics"][0]["fvu"] is None  # no variance over one token: null, not NaN


# ----- heatmap / activations / histograms ------------------------------------------------------
def test_heatmap_at_token_matches_dense(client, direct) -> None:
    *_, dense = direct
    pos = 3
    hm = post(client, "/api/heatmap", prompt=PROMPT, position=pos, threshold=1e-3).json()
    col = dense[:, pos]  # [L, n]
    want = sorted(int(j) for j in (col.max(0).values >= 1e-3).nonzero().squeeze(-1))
    assert sorted(hm["latents"]) == want
    for j, latent in enumerate(hm["latents"]):
        got = [hm["values"][li][j] for li in range(3)]
        assert got == pytest.approx(col[:, latent].tolist(), rel=1e-5)
        assert sum(hm["share"][li][j] for li in range(3)) == pytest.approx(1.0)
    assert hm["layer_mean"] == sorted(hm["layer_mean"])  # sorted by mean layer
    assert not hm["truncated"] and hm["n_above_threshold"] == len(want)


def test_heatmap_summed_threshold_and_cap(client, direct) -> None:
    *_, dense = direct
    total = dense.sum(1)  # [L, n]
    hm = post(client, "/api/heatmap", prompt=PROMPT, threshold=0.0).json()
    assert hm["position"] is None
    assert sorted(hm["latents"]) == sorted(
        int(j) for j in (total.max(0).values > 0).nonzero().squeeze(-1)
    )
    j = hm["latents"][0]
    assert [hm["values"][li][0] for li in range(3)] == pytest.approx(total[:, j].tolist())
    high = float(total.max()) * 0.5
    hm2 = post(client, "/api/heatmap", prompt=PROMPT, threshold=high).json()
    assert 0 < len(hm2["latents"]) < len(hm["latents"])
    assert all(
        max(hm2["values"][li][j] for li in range(3)) >= high for j in range(len(hm2["latents"]))
    )
    capped = post(client, "/api/heatmap", prompt=PROMPT, threshold=0.0, max_latents=3).json()
    assert len(capped["latents"]) == 3 and capped["truncated"]
    top3 = torch.topk(total[:, hm["latents"]].sum(0), 3).indices
    assert sorted(capped["latents"]) == sorted(hm["latents"][i] for i in top3.tolist())


def test_activations_match_dense(client, direct) -> None:
    *_, dense = direct
    j = int(dense[1].sum(0).argmax())
    body = post(client, "/api/activations", prompt=PROMPT, latent=j, layer=1).json()
    assert body["values"] == pytest.approx(dense[1, :, j].tolist(), rel=1e-5)
    assert body["by_layer"][2] == pytest.approx(dense[2, :, j].tolist(), rel=1e-5)
    assert body["max_value"] == pytest.approx(float(dense[:, :, j].max()), rel=1e-5)


def test_histograms(client, direct) -> None:
    *_, out, dense = direct
    h = post(client, "/api/histograms", prompt=PROMPT, bins=7).json()
    assert len(h["edges"]) == 8 and all(len(c) == 7 for c in h["counts"])
    active = (out.topk.values > 1e-3).flatten(1).sum(1)
    assert h["n_active"] == active.tolist()
    assert [sum(c) for c in h["counts"]] == active.tolist()
    assert h["edges"][-1] == pytest.approx(float(dense.max()), rel=1e-5)
    one = post(client, "/api/histograms", prompt=PROMPT, position=0).json()
    assert one["n_active"] == (out.topk.values[:, 0] > 1e-3).sum(-1).tolist()


# ----- examples --------------------------------------------------------------------------------
def test_examples_from_table(client, table) -> None:
    rows = table.to_pylist()
    r0 = max(rows, key=lambda r: r["activation"])
    body = client.get(f"/api/examples?latent={r0['latent']}&layer={r0['layer']}").json()
    assert body["available"] and body["examples"]
    want = sorted(
        (r for r in rows if r["latent"] == r0["latent"] and r["layer"] == r0["layer"]),
        key=lambda r: r["rank"],
    )
    assert [e["rank"] for e in body["examples"]] == [r["rank"] for r in want]
    assert body["total"] == len(want)
    first = body["examples"][0]
    assert first["activation"] == pytest.approx(r0["activation"])
    assert first["context_tokens"] == want[0]["context_tokens"]
    assert first["context_tokens"][first["centre"]] == first["token"]
    assert first["context_activations"][first["centre"]] == pytest.approx(first["activation"])
    acts = [e["activation"] for e in body["examples"]]
    assert acts == sorted(acts, reverse=True)
    limited = client.get(f"/api/examples?latent={r0['latent']}&layer={r0['layer']}&limit=1")
    assert len(limited.json()["examples"]) == 1


def test_examples_absent_and_empty(client, bare_client, table) -> None:
    body = bare_client.get("/api/examples?latent=0&layer=0").json()
    assert body["available"] is False and body["examples"] == []
    assert "run mlsae examples --repo_id runs/x" in body["message"]
    present = {(r["latent"], r["layer"]) for r in table.select(["latent", "layer"]).to_pylist()}
    missing = next((j, 1) for j in range(N_LATENTS) if (j, 1) not in present)
    body = client.get(f"/api/examples?latent={missing[0]}&layer=1").json()
    assert body["available"] and body["examples"] == [] and body["message"]


def test_examples_store_rejects_other_tables() -> None:
    import pyarrow as pa

    with pytest.raises(ValueError, match="not a max_examples table"):
        ExamplesStore(pa.table({"latent": [1], "layer": [0]}))


# ----- logits ----------------------------------------------------------------------------------
def test_logits_clean_and_reconstruction(client, pair, direct) -> None:
    sae, tf = pair
    ids, tokens, acts, out, _ = direct
    pos, layer = 4, 1
    body = post(client, "/api/logits", prompt=PROMPT, position=pos, layer=layer, top_k=5).json()
    with torch.no_grad():
        clean = tf.model(input_ids=tokens).logits[0, pos].float()
    top = torch.topk(clean, 5)
    assert [t["token_id"] for t in body["clean"]["top"]] == top.indices.tolist()
    assert [t["logit"] for t in body["clean"]["top"]] == pytest.approx(
        top.values.tolist(), abs=1e-4
    )
    spliced = splice_logits(tf, tokens, layer, out.recons[layer][None])
    delta = spliced[0, pos].float() - clean
    rec = body["recons"]
    assert [t["token_id"] for t in rec["top"]] == torch.topk(spliced[0, pos], 5).indices.tolist()
    assert rec["increases"][0]["delta"] == pytest.approx(float(delta.max()), abs=1e-4)
    assert rec["decreases"][0]["delta"] == pytest.approx(float(delta.min()), abs=1e-4)
    assert rec["max_abs_delta"] == pytest.approx(float(delta.abs().max()), abs=1e-4)
    p, q = torch.log_softmax(clean.double(), -1), torch.log_softmax(spliced[0, pos].double(), -1)
    assert rec["kl"] == pytest.approx(float((p.exp() * (p - q)).sum()), abs=1e-6)
    assert body["steer"] is None and body["token"] == "went"


def test_steering_scale_mode(client, pair, direct) -> None:
    sae, tf = pair
    ids, tokens, acts, out, dense = direct
    layer, pos = 1, 5
    j = int(dense[layer, : pos + 1].sum(0).argmax())  # active at or before the position
    base = dict(prompt=PROMPT, position=pos, layer=layer, latent=j)
    same = post(client, "/api/logits", **base, factor=1.0).json()["steer"]
    assert same["max_abs_delta"] == pytest.approx(0.0, abs=1e-5) and same["kl"] == pytest.approx(
        0.0, abs=1e-9
    )
    # factor 0: subtract the latent's decoded contribution, x' = x - v * s * d_j
    s = out.stats.std[layer]  # [P, 1]
    v = dense[layer, :, j].float()[:, None]  # [P, 1]
    repl = acts[layer] - v * s * sae.decoder.weight[:, j].detach()[None, :]
    want = splice_logits(tf, tokens, layer, repl[None])
    with torch.no_grad():
        clean = tf.model(input_ids=tokens).logits[0, pos].float()
    got = post(client, "/api/logits", **base, factor=0.0, top_k=3).json()["steer"]
    assert got["max_abs_delta"] == pytest.approx(
        float((want[0, pos] - clean).abs().max()), rel=1e-4
    )
    assert [t["token_id"] for t in got["top"]] == torch.topk(want[0, pos], 3).indices.tolist()
    big = post(client, "/api/logits", **base, factor=8.0).json()["steer"]
    assert big["max_abs_delta"] > 1e-3 and big["kl"] > 0


def test_steering_add_mode_uses_example_scale(client, table) -> None:
    rows = table.to_pylist()
    r0 = max(rows, key=lambda r: r["activation"])
    body = post(
        client,
        "/api/logits",
        prompt=PROMPT,
        position=2,
        layer=r0["layer"],
        latent=r0["latent"],
        factor=3.0,
        mode="add",
    ).json()["steer"]
    assert body["mode"] == "add" and body["scale_source"] == "max-activating examples"
    assert body["scale"] == pytest.approx(r0["activation"])
    assert body["max_abs_delta"] > 0 and body["delta_norm"] > 0


def test_steering_add_mode_without_examples(bare_client) -> None:
    body = post(
        bare_client,
        "/api/logits",
        prompt=PROMPT,
        position=2,
        layer=0,
        latent=5,
        factor=2.0,
        mode="add",
    ).json()["steer"]
    assert body["scale"] > 0 and "prompt" in body["scale_source"]


# ----- bad input: always 4xx with a message, never a 500 -------------------------------------
BAD_POSTS = [
    ("/api/prompt", {}, "prompt"),
    ("/api/prompt", {"prompt": ""}, "prompt"),
    ("/api/prompt", {"prompt": "   "}, "prompt is empty"),
    ("/api/prompt", {"prompt": 7}, "prompt"),
    ("/api/prompt", {"prompt": "x" * 2001}, "characters; the limit is 2000"),
    ("/api/prompt", {"prompt": "Mary " * 41}, "tokens; the limit is 40"),
    ("/api/prompt", {"prompt": "x" * 30_000}, "prompt"),
    ("/api/prompt", {"prompt": PROMPT, "path": "/etc/passwd"}, "path: unknown field"),
    ("/api/heatmap", {"prompt": PROMPT, "position": 99}, "position=99"),
    ("/api/heatmap", {"prompt": PROMPT, "position": -1}, "position"),
    ("/api/heatmap", {"prompt": PROMPT, "threshold": -1}, "threshold"),
    ("/api/heatmap", {"prompt": PROMPT, "threshold": "lots"}, "threshold"),
    ("/api/heatmap", {"prompt": PROMPT, "max_latents": 0}, "max_latents"),
    ("/api/activations", {"prompt": PROMPT, "latent": 64, "layer": 0}, "latent=64"),
    ("/api/activations", {"prompt": PROMPT, "latent": 1, "layer": 3}, "layer=3"),
    ("/api/activations", {"prompt": PROMPT, "latent": 1.5, "layer": 0}, "latent"),
    ("/api/activations", {"prompt": PROMPT, "layer": 0}, "latent: Field required"),
    ("/api/histograms", {"prompt": PROMPT, "bins": 0}, "bins"),
    ("/api/histograms", {"prompt": PROMPT, "bins": 101}, "bins"),
    ("/api/histograms", {"prompt": PROMPT, "position": 50}, "position=50"),
    ("/api/logits", {"prompt": PROMPT, "layer": 0}, "position"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 9}, "layer=9"),
    ("/api/logits", {"prompt": PROMPT, "position": 40, "layer": 0}, "position=40"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 0, "latent": 999}, "latent=999"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 0, "factor": 1e9}, "factor"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 0, "mode": "boost"}, "mode"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 0, "top_k": 0}, "top_k"),
    ("/api/logits", {"prompt": PROMPT, "position": 0, "layer": 0, "top_k": 10**6}, "top_k"),
    ("/api/logits", [1, 2], "body"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_POSTS)
def test_bad_posts_are_422_with_message(client, path, body, message) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, (path, body, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail, detail
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"prompt": "a", "position": 0, "layer": 0, "factor": NaN}', "factor"),
        (b'{"prompt": "a", "position": 0, "layer": 0, "factor": Infinity}', "factor"),
        (b"", "body"),
        ('{"prompt": "\udcff"}'.encode("utf-8", "surrogatepass"), ""),
    ],
)
def test_malformed_bodies(client, raw, message) -> None:
    r = client.post("/api/logits", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("latent=-1&layer=0", "latent"),
        ("latent=abc&layer=0", "latent"),
        ("latent=64&layer=0", "latent=64"),
        ("latent=1&layer=5", "layer=5"),
        ("layer=0", "latent: Field required"),
        ("latent=1&layer=0&limit=0", "limit"),
        ("latent=99999999999999999999999&layer=0", "latent"),
    ],
)
def test_bad_example_queries(client, query, message) -> None:
    r = client.get(f"/api/examples?{query}")
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_other_bad_requests(client) -> None:
    r = client.post(
        "/api/prompt", content=b"x" * 70_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    r = client.post("/api/prompt", content=b"prompt=hi", headers={"content-type": "text/plain"})
    assert r.status_code == 422
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/prompt").status_code == 405
    assert client.get("/api/nothing").json()["detail"]


# ----- caching ---------------------------------------------------------------------------------
def test_byte_lru_bounds() -> None:
    lru = ByteLRU(max_entries=3, max_bytes=100)
    for i in range(5):
        lru.put(i, i, 10)
    assert lru.stats()["entries"] == 3 and lru.get(0) is None and lru.get(4) == 4
    lru.put("big", 1, 90)  # evicts by bytes, oldest first
    assert lru.stats()["bytes"] <= 100 and lru.get("big") == 1 and lru.get(3) is None
    lru.put("huge", 1, 101)  # larger than the budget: not kept
    assert lru.get("huge") is None and lru.stats()["bytes"] <= 100


def test_prompt_cache_is_bounded_and_fast(pair) -> None:
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import create_app

    sae, tf = pair
    app = create_app(sae, tf, settings=ExplorerSettings(cache_entries=3, splice_cache_entries=2))
    ex = app.state.explorer
    with TestClient(app) as c:
        for i in range(6):
            assert post(c, "/api/prompt", prompt=f"{PROMPT} {i}").status_code == 200
            assert (
                post(c, "/api/logits", prompt=f"{PROMPT} {i}", position=0, layer=0).status_code
                == 200
            )
        assert ex.cache.stats()["entries"] == 3 and ex.splices.stats()["entries"] == 2
        first = ex.cache.stats()
        t0 = time.perf_counter()
        assert post(c, "/api/heatmap", prompt=f"{PROMPT} 5").status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert ex.cache.stats()["hits"] == first["hits"] + 1
        assert ex.cache.stats()["misses"] == first["misses"]


# ----- CLI and loading from a checkpoint ------------------------------------------------------
def test_cli_registry_and_defaults() -> None:
    from mlsae_core.cli import COMMANDS, build_parser

    assert "explore" in COMMANDS
    parser, _ = build_parser()
    args = parser.parse_args(["explore", "--repo_id", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_cli_list_and_errors(tmp_path, capsys) -> None:
    from mlsae_core.cli import main

    ckpt = build_checkpoint(tmp_path, with_examples=False)
    assert main(["explore", "--list", "--data_dir", str(tmp_path)]) == 0
    assert str(ckpt) in capsys.readouterr().out
    assert main(["explore"]) == 2
    assert "--repo_id is required" in capsys.readouterr().err
    assert main(["explore", "--repo_id", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explore", "--repo_id", str(ckpt), "--port", "0"]) == 2


def test_load_app_from_checkpoint(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import load_app

    ckpt = build_checkpoint(tmp_path, with_examples=True)
    with TestClient(load_app(str(ckpt))) as c:
        info = c.get("/api/info").json()
        assert info["examples"]["available"] and info["sae"]["layers"] == LAYERS
        assert post(c, "/api/prompt", prompt=PROMPT).status_code == 200
    examples_file(ckpt).write_bytes(b"not parquet")
    with TestClient(load_app(str(ckpt))) as c:
        msg = c.get("/api/info").json()["examples"]["message"]
        assert "could not be read" in msg and "mlsae examples --repo_id" in msg
        assert "max_examples.parquet does not match the sha256" in msg  # verified first
    examples_file(ckpt).unlink()
    with TestClient(load_app(str(ckpt))) as c:
        assert c.get("/api/examples?latent=0&layer=0").json()["message"] == (
            f"no examples computed; run mlsae examples --repo_id {ckpt}"
        )


def test_finite_json_everywhere(client) -> None:
    body = post(client, "/api/heatmap", prompt="Mary", threshold=0.0).json()
    text = str(body)
    assert "nan" not in text.lower() and "inf" not in text.lower().replace("info", "")
    assert all(isinstance(v, float | int) or v is None for row in body["values"] for v in row)
    assert not any(isinstance(v, float) and math.isnan(v) for row in body["share"] for v in row)


def test_storage_layout_run_and_moved_model(tmp_path, capsys) -> None:
    """A run of a storage root, <root>/saes/<model>/<sae>, holds its max_examples table like
    any checkpoint directory, is listed by --list, and finds its model in <root>/models/<model>
    when the recorded model directory has moved (the root was copied elsewhere)."""
    import shutil

    from fastapi.testclient import TestClient

    from mlsae_core.cli import main
    from mlsae_core.explorer.server import load_app
    from mlsae_core.layout import StorageLayout

    built = build_checkpoint(tmp_path / "build", with_examples=True)
    layout = StorageLayout(tmp_path / "data")
    run = layout.run("tiny-llama", "x2-k4-Lall")
    shutil.copytree(built, run.directory)
    shutil.move(tmp_path / "build" / "model", layout.model_dir("tiny-llama"))
    assert main(["explore", "--list", "--data_dir", str(layout.root)]) == 0
    assert f"{run.directory}    examples: yes" in capsys.readouterr().out
    with TestClient(load_app(str(run.directory))) as c:
        info = c.get("/api/info").json()
        assert info["examples"]["available"] and info["examples"]["rows"] > 0
        assert post(c, "/api/prompt", prompt=PROMPT).status_code == 200
    other = tmp_path / "elsewhere.parquet"
    with TestClient(load_app(str(run.directory), ExplorerSettings(examples=other))) as c:
        assert (
            "elsewhere.parquet does not exist" in c.get("/api/info").json()["examples"]["message"]
        )


def test_settings_are_the_flags() -> None:
    """Every flag of `mlsae explore` comes from ExplorerSettings, defaults included."""
    from mlsae_core.cli import build_parser
    from mlsae_core.config import ConfigError, from_args

    parser, _ = build_parser()
    defaults = from_args(ExplorerSettings, parser.parse_args(["explore", "--repo_id", "x"]))
    assert defaults == ExplorerSettings()
    args = parser.parse_args(
        ["explore", "--repo_id", "x", "--max_prompt_tokens", "64", "--cache_mb", "2"]
        + ["--port", "9000", "--examples", "t.parquet", "--model_name", "m", "--device", "cpu"]
    )
    got = from_args(ExplorerSettings, args)
    assert got.max_prompt_tokens == 64 and got.cache_bytes == 2 * 2**20 and got.port == 9000
    assert got.examples == Path("t.parquet") and got.model_name == "m"
    with pytest.raises(ConfigError, match="cache_entries=0 is not allowed"):
        ExplorerSettings(cache_entries=0)


def test_prompt_metrics_without_variance() -> None:
    """A repeated token gives identical vectors: FVU is null (no variance), not a huge number."""
    x = torch.randn(2, 1, 8).expand(2, 3, 8).contiguous()  # [L, P, d], every token the same
    recons = x + 0.1
    values = torch.ones(2, 3, 2)
    indices = torch.zeros(2, 3, 2, dtype=torch.long)
    special = torch.zeros(3, dtype=torch.bool)
    rows = prompt_metrics([0, 1], x, recons, values, indices, special, 4, 1e-3)
    assert [r["fvu"] for r in rows] == [None, None]
    assert [r["mse"] for r in rows] == pytest.approx([0.01, 0.01])
    assert [r["l0"] for r in rows] == [2.0, 2.0]


def test_streamed_body_is_limited(client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/api/prompt", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    r = client.post("/api/prompt", content=b"{}", headers={"content-length": "abc"})
    assert r.status_code == 400
