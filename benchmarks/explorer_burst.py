"""A bounded burst measurement of the explorer: RSS and latency under many concurrent requests.

`python -m benchmarks.explorer_burst --repo_id DIR` starts `mlsae explore` in a subprocess on
a free 127.0.0.1 port (so the RSS measured is the server's alone), waits until it answers,
then fires `--rounds` bursts of `--requests` concurrent requests of distinct, long prompts
(cache misses: analyses, heatmaps, histograms, logits with a new splice each) and prints one
JSON report: RSS idle / peak / after, p50 / p95 latency, the status codes. Peak RSS is the
kernel's high-water mark (VmHWM, reset after start-up via /proc/PID/clear_refs) and a 20 ms
sampler. Traffic goes to loopback only and is bounded in count and time (`--timeout`).
tests/test_explorer_load.py runs it on the tiny model; docs/explorer.md has the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

MIB = 2**20
# Words that are one token each in the tests' tiny tokenizer and (mostly) in SmolLM2's.
WORDS = (
    "When Mary and John went to the store , John gave a drink to Mary . The quick brown fox "
    "jumps over the lazy dog . A cat sat on the mat and the dog sat on the log ."
).split()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (bytes) of `pid` from /proc (Linux)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of `pid` (Linux >= 4.0), so VmHWM is the burst's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's RSS every `every` seconds in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def burst_requests(n: int, n_words: int, seed: int, layers: Sequence[int]) -> list[tuple]:
    """`n` (path, body) pairs of distinct prompts of about `n_words` words, all endpoints."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(n_words - 1)]
        prompt = f"{i} " + " ".join(words)  # distinct: every request misses the cache
        layer = layers[i % len(layers)]
        kind = i % 5
        if kind == 0:
            out.append(("/api/prompt", {"prompt": prompt}))
        elif kind == 1:
            out.append(("/api/heatmap", {"prompt": prompt, "position": None}))
        elif kind == 2:
            out.append(("/api/histograms", {"prompt": prompt, "bins": 50}))
        elif kind == 3:
            out.append(("/api/activations", {"prompt": prompt, "latent": i % 7, "layer": layer}))
        else:
            body = {"prompt": prompt, "position": 1, "layer": layer, "latent": i % 7}
            out.append(("/api/logits", {**body, "factor": 3.0, "top_k": 10}))
    return out


async def _fire(base: str, reqs: list[tuple], timeout: float) -> list[tuple[int, float]]:
    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def one(path: str, body: dict) -> tuple[int, float]:
            t0 = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                code = r.status_code
            except httpx.HTTPError:
                code = 0  # connection error or timeout: reported, never retried
            return code, time.perf_counter() - t0

        return await asyncio.gather(*(one(p, b) for p, b in reqs))


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of xs, rounded to ms; None when xs is empty."""
    s = sorted(xs)
    return round(s[round(q * (len(s) - 1))], 3) if s else None


def measure(
    base: str, pid: int, requests: int = 200, rounds: int = 3, timeout: float = 300.0
) -> dict[str, Any]:
    """Fire `rounds` bursts of `requests` concurrent requests at the server `pid` on `base`."""
    info = httpx.get(f"{base}/api/info", timeout=30).json()
    layers = info["sae"]["layers"]
    n_words = max(2, int(info["limits"]["max_prompt_tokens"] * 0.8))
    # warm-up: one of each view, so lazy initialisation is not counted as growth
    asyncio.run(_fire(base, burst_requests(5, n_words, -1, layers), timeout))
    time.sleep(0.5)
    idle_status = proc_status(pid)
    idle = idle_status["VmRSS"]
    hwm_reset = reset_peak(pid)
    codes: Counter[int] = Counter()
    latencies: list[float] = []
    refused: list[float] = []
    t0 = time.perf_counter()
    with RssSampler(pid) as sampler:
        for r in range(rounds):
            got = asyncio.run(_fire(base, burst_requests(requests, n_words, r, layers), timeout))
            codes.update(c for c, _ in got)
            latencies += [t for c, t in got if c == 200]
            refused += [t for c, t in got if c == 503]
    wall = time.perf_counter() - t0
    time.sleep(1.0)
    status = proc_status(pid)
    peak = max(sampler.peak, status["VmHWM"] if hwm_reset else 0)
    final = httpx.get(f"{base}/api/info", timeout=30).json()
    return {
        "model": info["model_name"],
        "layers": len(layers),
        "n_latents": info["sae"]["n_latents"],
        "prompt_words": n_words,
        "requests": requests * rounds,
        "concurrency": requests,
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "rss_idle_mib": round(idle / MIB, 1),
        "rss_peak_mib": round(peak / MIB, 1),
        "rss_after_mib": round(status["VmRSS"] / MIB, 1),
        "anon_idle_mib": round(idle_status["RssAnon"] / MIB, 1),
        "anon_after_mib": round(status["RssAnon"] / MIB, 1),
        "file_idle_mib": round(idle_status["RssFile"] / MIB, 1),
        "growth_peak_mib": round((peak - idle) / MIB, 1),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": percentile(latencies, 1.0),
        "latency_p95_503_s": percentile(refused, 0.95),
        "wall_s": round(wall, 1),
        "memory": final.get("memory"),
        "cache": final["cache"],
        "splice_cache": final["splice_cache"],
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(repo_id: str, extra: Sequence[str] = (), env: dict[str, str] | None = None):
    """Start `mlsae explore` on a free loopback port; returns (process, base URL) once ready."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlsae_core.cli", "explore", "--repo_id", repo_id]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlsae explore exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/api/info", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError("mlsae explore did not start within 300 s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server this module started (by its pid only)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo_id", required=True, help="checkpoint directory to serve")
    p.add_argument("--requests", type=int, default=200, help="concurrent requests per burst")
    p.add_argument("--rounds", type=int, default=3, help="bursts, one after the other")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("server_args", nargs="*", help="extra `mlsae explore` flags (after --)")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1000 or not 1 <= args.rounds <= 20:
        p.error("--requests must be 1..1000 and --rounds 1..20 (a bounded measurement)")
    proc, base = serve(args.repo_id, args.server_args)
    try:
        report = measure(base, proc.pid, args.requests, args.rounds, args.timeout)
    finally:
        stop(proc)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
