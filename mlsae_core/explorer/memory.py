"""The explorer's memory bound (docs/explorer.md, "Performance and memory", says why each part
is needed): `Gate`, at most `workers` requests computed at once and `max_queue` waiting, then 503
+ Retry-After; `tune_allocator`, glibc's mmap threshold and arena count; `result_bytes` and
`working_set_bytes` and `latent_bytes`, the terms of the bound that `Explorer.memory_bound` reports in /api/info.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.exceptions import HTTPException

T = TypeVar("T")

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20
ARENA_MAX = 2
# Allowance for what no formula counts: Python objects, small-block fragmentation, tokenizer
# and thread stacks. Measured (docs/explorer.md) well under this.
SLACK_BYTES = 96 << 20


class Gate:
    """At most `workers` calls run at once, on fixed threads (which bound the working sets
    and the malloc arenas); `max_queue` more may wait. Thread-based, so one gate serves any
    event loop (TestClient starts one per client)."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.workers, self.max_queue = workers, max_queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explorer")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._mean_s = 0.5  # running mean of a call's duration, for Retry-After
        self.rejected = 0
        self.peak = 0

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.workers + self.max_queue:
                self.rejected += 1
                waiting = self._admitted - self.workers
                after = max(1, math.ceil(self._mean_s * (waiting + 1) / self.workers))
                busy = f"the explorer is busy ({waiting} requests waiting); retry in {after} s"
                raise HTTPException(503, busy, headers={"Retry-After": str(after)})
            self._admitted += 1
            self.peak = max(self.peak, self._admitted)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._mean_s = 0.9 * self._mean_s + 0.1 * dt

    def _release(self, _: Future | None) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a worker thread; 503 (Retry-After) when the queue is full.

        The slot is released when the call ends, not when the client goes away, so a
        disconnected burst cannot start more work than the bound.
        """
        self._admit()
        try:
            future = self._pool.submit(self._timed, fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self.workers,
                "max_queue": self.max_queue,
                "in_flight": self._admitted,
                "peak_in_flight": self.peak,
                "rejected": self.rejected,
            }


def tune_allocator() -> bool:
    """glibc: fixed 1 MiB mmap threshold, 2 arenas; False (nothing done) elsewhere.

    Process-wide, so only `mlsae explore` calls it, before its threads start.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1
    ok &= libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    return bool(ok)


def result_bytes(n_model_layers: int, n_sae_layers: int, p: int, d: int, k: int) -> int:
    """Bytes of one cached prompt analysis (`PromptResult.nbytes`) of `p` tokens."""
    hidden = n_model_layers * p * d * 4
    recons = n_sae_layers * p * d * 4
    topk = n_sae_layers * p * k * (4 + 8)
    return hidden + recons + topk + n_sae_layers * p * 4 + 64 * p + 4096


def working_set_bytes(
    n_model_layers: int, n_sae_layers: int, p: int, d: int, k: int, n_latents: int, vocab: int
) -> int:
    """Peak bytes one request adds besides the caches: its result (held while it is used,
    cached or evicted) and the analysis' transients: the SAE's inputs, their standardized copy
    and its reconstruction [L, P, d], the dense pre-activations [L, P, n] twice (matmul out,
    ReLU), the model's per-block activations, and a view's [L, n] float64 and [V] logits."""
    result = result_bytes(n_model_layers, n_sae_layers, p, d, k)
    sae = 3 * n_sae_layers * p * d * 4 + 2 * n_sae_layers * p * n_latents * 4
    blocks = 16 * p * d * 4
    views = 3 * n_sae_layers * n_latents * 8 + 4 * vocab * 8
    return result + sae + blocks + views


def latent_bytes(n_sae_layers: int, tokens: int, k: int, n_latents: int) -> tuple[int, int]:
    """(kept, per page) bytes of the latent pages (`latent.LatentPages`). Kept once computed:
    the held-out sample's top-k (float32 values, int32 ids) and tokens (ids, mask, document),
    and the layer distributions (three [L, n] float64, seven [n]). Per page: a [L, T, k] mask
    and values, the latent's [L, T] row, and the decoder cosines [n]."""
    kept = n_sae_layers * tokens * k * 8 + tokens * 13 + (3 * n_sae_layers + 7) * n_latents * 8
    page = n_sae_layers * tokens * (5 * k + 4) + 2 * n_latents * 8
    return kept, page
