"""A bounded load test on loopback: 50 concurrent prompt requests against a running server.

uvicorn serves the app in a thread on a free 127.0.0.1 port; an httpx async client fires 50
requests at once (40 distinct prompts, some repeated, plus heatmaps and logits). All must
succeed, the prompt cache must stay within its entry and byte limits, and a cached prompt
must answer in well under a second.
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
        assert len(ex.cache) <= CACHE_ENTRIES and ex.cache.nbytes <= CACHE_BYTES
        assert len(ex.splices) <= 8
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
