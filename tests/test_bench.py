"""Smoke test of the benchmark machinery on a tiny model (no timing assertions).

The baseline is the package's own `mlsae_core.bench_baseline`, so the pair must be complete
on a fresh checkout with nothing beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from mlsae_core.bench import main


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
    assert "baseline_error" not in pair and "baseline_note" not in pair, pair
    assert pair["baseline_tokens_per_s"] > 0 and pair["baseline_peak_rss_mb"] > 0
    assert abs(pair["ratio"] - pair["tokens_per_s"] / pair["baseline_tokens_per_s"]) < 0.01


def test_baseline_eval_runs(tmp_path):
    """The stand-in's eval mode (splices every layer to full logits) runs as the bench runs it:
    `python -m mlsae_core.bench_baseline` in its own process (it sets threads and the seed)."""
    from mlsae_core.bench import ROOT, TINY_SHAPE, make_model_dir

    model = make_model_dir(tmp_path / "model", TINY_SHAPE)
    cmd = [sys.executable, "-m", "mlsae_core.bench_baseline", "--model", str(model)]
    cmd += ["--mode", "eval", "--batch-size", "1", "--max-length", "16", "--reps", "1"]
    cmd += ["--warmup", "0", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["name"] == "baseline/eval" and rec["tokens_per_s"] > 0
