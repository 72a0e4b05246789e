"""Smoke test of the benchmark machinery on a tiny model (no timing assertions)."""

from __future__ import annotations

import json

from mlsae_core.bench import DEFAULT_BASELINE, main


def test_bench_json_fields(tmp_path):
    out = tmp_path / "bench.jsonl"
    args = ["--tiny", "--reps", "1", "--warmup", "0", "--json", str(out)]
    args += ["--only", "train/x16-k32", "--only", "extract", "--only", "sae-step/x16"]
    args += ["--only", "eval-exact"]
    assert main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in recs] == [
        "train/x16-k32",
        "eval-exact/x16-k32",
        "sae-step/x16-k32",
        "extract/pythia70m-arch",
    ]
    for r in recs:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["config"]["expansion_factor"] == 16 and r["config"]["k"] == 32
    assert recs[1]["note"] == "delta_dtype=float32"  # the exact path, as named
    pair = recs[0]
    if DEFAULT_BASELINE.is_file():
        assert pair["baseline_tokens_per_s"] > 0 and pair["baseline_peak_rss_mb"] > 0
        assert abs(pair["ratio"] - pair["tokens_per_s"] / pair["baseline_tokens_per_s"]) < 0.01
