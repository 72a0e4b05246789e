"""Bounded load tests on loopback: concurrent requests against a running server.

* 50 at once: uvicorn serves the app in a thread on a free 127.0.0.1 port; an httpx async
  client fires 50 requests (40 distinct prompts, some repeated, plus heatmaps and logits).
  All must succeed, the prompt cache must stay within its entry and byte limits, and a cached
  prompt must answer in well under a second.
* memory: `mlsae explore` in a subprocess under 2 bursts of 200 (`benchmarks.explorer_burst`, the same
  measurement docs/explorer.md reports for SmolLM2): peak RSS above idle stays under the
  bound the server documents.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.server import create_app
from tests.test_explorer_api import PROMPT, serve_in_thread, tiny_pair

CACHE_ENTRIES = 8
CACHE_MB = 2
CACHE_BYTES = CACHE_MB * 2**20


def test_fifty_concurrent_prompt_requests() -> None:
    sae, tf = tiny_pair()
    settings = ExplorerSettings(
        cache_entries=CACHE_ENTRIES, cache_mb=CACHE_MB, splice_cache_entries=8
    )
    app = create_app(sae, tf, settings=settings)
    ex = app.state.explorer
    words = PROMPT.split()
    prompts = [
        " ".join(words[: 3 + i % 10]) + f" {'Mary John'.split()[i % 2]}" * (i // 10)
        for i in range(40)
    ]
    prompts += prompts[:10]  # repeats: cache hits (or waits on the same computation)
    assert len(prompts) == 50

    async def fire(base: str) -> list[httpx.Response]:
        limits_ = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits_) as c:
            reqs = []
            for i, p in enumerate(prompts):
                if i % 5 == 3:
                    reqs.append(c.post("/api/heatmap", json={"prompt": p}))
                elif i % 5 == 4:
                    reqs.append(
                        c.post(
                            "/api/logits",
                            json={"prompt": p, "position": 0, "layer": 1, "latent": 3},
                        )
                    )
                else:
                    reqs.append(c.post("/api/prompt", json={"prompt": p}))
            return await asyncio.gather(*reqs)

    with serve_in_thread(app) as base:
        t0 = time.perf_counter()
        responses = asyncio.run(fire(base))
        elapsed = time.perf_counter() - t0
        bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not bad, bad
        stats = httpx.get(f"{base}/api/info").json()["cache"]
        assert stats["entries"] <= CACHE_ENTRIES and stats["bytes"] <= CACHE_BYTES
        held = ex.cache.stats()
        assert held["entries"] <= CACHE_ENTRIES and held["bytes"] <= CACHE_BYTES
        assert ex.splices.stats()["entries"] <= 8
        assert 40 <= stats["prompts_analysed"] <= 50

        # a new prompt requested 20 times at once is analysed once (the others wait for it)
        async def same(base: str) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                body = {"prompt": "the dog sat on the log"}
                return await asyncio.gather(*(c.post("/api/prompt", json=body) for _ in range(20)))

        n0 = ex.n_analysed
        assert all(r.status_code == 200 for r in asyncio.run(same(base)))
        assert ex.n_analysed == n0 + 1
        # responsive: a cached prompt answers in well under a second
        httpx.post(f"{base}/api/prompt", json={"prompt": PROMPT})
        t1 = time.perf_counter()
        r = httpx.post(f"{base}/api/heatmap", json={"prompt": PROMPT, "position": 2})
        assert r.status_code == 200 and time.perf_counter() - t1 < 1.0
    assert elapsed < 60


# ----- memory under a sustained burst ---------------------------------------------------------
BURST_REQUESTS, BURST_ROUNDS = 200, 2
LAYERS4 = [0, 1, 2, 3]


def wide_checkpoint(root) -> str:
    """A tiny Llama with a wide MLSAE (8192 latents): each analysis' dense pre-activations are
    ~17 MB, so holding many analyses at once (the old 40-thread pool) shows in RSS."""
    from mlsae_core.sae import MLSAE
    from tests.tiny import tiny_transformer

    tf = tiny_transformer("llama", n_layers=4, d=64)
    model_dir = root / "model"
    tf.model.save_pretrained(model_dir, safe_serialization=True)
    tf.tokenizer.save_pretrained(model_dir)
    sae = MLSAE(64, 8192, 8, auxk=None, metadata={"model_name": str(model_dir), "layers": LAYERS4})
    sae.save_pretrained(root / "ckpt")
    return str(root / "ckpt")


def test_memory_stays_within_the_bound_under_a_burst(tmp_path) -> None:
    """`mlsae explore` in a subprocess, 2 bursts of 200 concurrent requests of new prompts (all
    endpoints; the cache misses every time): peak RSS above idle stays under the bound the
    server reports (/api/info memory.bound_bytes: caches + workers x working set + slack),
    every request answers 200 or 503 (busy), and the accepted ones in bounded time."""
    from benchmarks import explorer_burst as burst

    proc, base = burst.serve(wide_checkpoint(tmp_path), ["--cache_mb", "16"])
    try:
        report = burst.measure(base, proc.pid, BURST_REQUESTS, BURST_ROUNDS, timeout=120)
        r = httpx.post(f"{base}/api/prompt", json={"prompt": PROMPT})
        assert r.status_code == 200
    finally:
        burst.stop(proc)
    print(report)
    codes = report["status_codes"]
    assert set(codes) <= {"200", "503"}, codes
    assert sum(codes.values()) == BURST_REQUESTS * BURST_ROUNDS
    mem = report["memory"]
    assert codes["200"] >= BURST_ROUNDS * (mem["workers"] + mem["max_queue"]) // 2, codes
    assert mem["peak_in_flight"] <= mem["workers"] + mem["max_queue"]
    bound_mib = mem["bound_bytes"] / 2**20
    assert report["growth_peak_mib"] <= bound_mib, (report["growth_peak_mib"], bound_mib)
    assert report["cache"]["bytes"] <= 16 * 2**20
    assert report["latency_p95_s"] < 60
