"""Smoke test of the benchmark machinery on a tiny model (no timing assertions).

The baseline is the repo's own `benchmarks.bench_baseline`, so the pair must be complete
on a fresh checkout with nothing beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.bench import line_flops, main


def _close(a: float, b: float) -> bool:
    """Equal within the 4 significant digits the roofline fields are rounded to."""
    return abs(a - b) <= 1e-3 * abs(b)


def test_bench_json_fields(tmp_path):
    import torch

    from mlsae_core.evaluate import resolve_delta_dtype

    out = tmp_path / "bench.jsonl"
    args = ["--tiny", "--reps", "1", "--warmup", "0", "--json", str(out)]
    args += ["--only", "train/x16-k32", "--only", "extract", "--only", "sae-step/x16"]
    args += ["--only", "eval-exact", "--only", "eval/x16"]
    assert main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    bf16 = resolve_delta_dtype("auto", "cpu") == torch.bfloat16
    peak_names = ["peak/float32"] + (["peak/bfloat16"] if bf16 else [])
    assert [r["name"] for r in recs] == [
        *peak_names,
        "train/x16-k32",
        "eval/x16-k32",
        "eval-exact/x16-k32",
        "sae-step/x16-k32",
        "extract/pythia70m-arch",
    ]
    peaks = {r["dtype"]: r["gflops"] for r in recs[: len(peak_names)]}
    assert all(g > 0 for g in peaks.values()) and list(peaks) == [n[5:] for n in peak_names]
    lines = {r["name"]: r for r in recs[len(peak_names) :]}
    for r in lines.values():
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["config"]["expansion_factor"] == 16 and r["config"]["k"] == 32
        # The roofline: cost > 0, achieved = cost * rate, fraction of the named dtype's peak.
        assert r["flops_per_token"] > 0
        assert r["flops_per_token"] == sum(r["flops_by_dtype"].values())
        assert _close(r["achieved_gflops"], r["flops_per_token"] * r["tokens_per_s"] / 1e9)
        assert r["peak_dtype"] in peaks and r["peak_fraction"] > 0
        assert _close(r["peak_fraction"], r["achieved_gflops"] / peaks[r["peak_dtype"]])
    assert lines["eval-exact/x16-k32"]["note"] == "delta_dtype=float32"  # the exact path
    assert set(lines["eval-exact/x16-k32"]["flops_by_dtype"]) == {"float32"}
    # eval and eval-exact do the same work, split by dtype as the splice GEMM runs.
    ev = lines["eval/x16-k32"]
    assert ev["flops_per_token"] == lines["eval-exact/x16-k32"]["flops_per_token"]
    assert set(ev["flops_by_dtype"]) == ({"float32", "bfloat16"} if bf16 else {"float32"})
    for name in ("train/x16-k32", "eval/x16-k32"):
        pair = lines[name]
        assert "baseline_error" not in pair and "baseline_note" not in pair, pair
        assert pair["baseline_tokens_per_s"] > 0 and pair["baseline_peak_rss_mb"] > 0
        assert abs(pair["ratio"] - pair["tokens_per_s"] / pair["baseline_tokens_per_s"]) < 0.01
        base_rate = pair["baseline_tokens_per_s"]
        assert _close(pair["baseline_achieved_gflops"], pair["flops_per_token"] * base_rate / 1e9)
        assert pair["baseline_peak_fraction"] > 0


def test_line_flops_hand_count():
    """The cost model against a count by hand: 3 blocks of 10/20/30 params, d 4, n 16, k 2,
    vocab 8, SAE on layers 0 and 2."""
    blocks, d, n, k, vocab, layers = [10, 20, 30], 4, 16, 2, 8, [0, 2]
    # per vector per layer: encoder 2*4*16 = 128, decode 2*2*4 = 16, sparse backward 6*2*4 = 48
    sae_train = 2 * (128 + 16 + 48)  # 384
    assert line_flops("sae-step", blocks, d, n, k, vocab, layers) == {"float32": sae_train}
    assert line_flops("extract", blocks, d, n, k, vocab, layers) == {"float32": 2 * 60}
    assert line_flops("extract", blocks, d, n, k, vocab, [0, 1]) == {"float32": 2 * 30}
    assert line_flops("train", blocks, d, n, k, vocab, layers) == {"float32": 120 + sae_train}
    assert line_flops("train", blocks, d, n, k, vocab, [1]) == {"float32": 60 + 192}
    # eval: clean pass 120 + clean unembedding 2*4*8 = 64 + encode 2*(128+16) = 288
    # + rerun after layer 0: 2*(20+30) = 100 (after layer 2: nothing) + 2 splice unembeddings 128
    exact = line_flops("eval-exact", blocks, d, n, k, vocab, layers)
    assert exact == {"float32": 120 + 64 + 288 + 100 + 128}
    bf = line_flops("eval", blocks, d, n, k, vocab, layers, "bfloat16")
    assert bf == {"float32": 120 + 64 + 288 + 100, "bfloat16": 128}
    assert line_flops("analysis", blocks, d, n, k, vocab, layers, "bfloat16") == bf
    with pytest.raises(ValueError):
        line_flops("nope", blocks, d, n, k, vocab, layers)


def test_line_flops_pythia_shape():
    """The bench model's blocks count as a GPT-NeoX block should (12 d^2 + 13 d params: QKV,
    output, 4x MLP with biases, two LayerNorms), so the docs' per-token figures hold."""
    from benchmarks.bench import PYTHIA_70M_SHAPE
    from tests.tiny import tiny_model

    d, n_layers, vocab = 512, 6, 50304
    block = 12 * d * d + 13 * d
    model = tiny_model("gpt_neox", **PYTHIA_70M_SHAPE, seed=0, rotary_pct=0.25)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.gpt_neox.layers]
    assert blocks == [block] * n_layers
    train = line_flops("train", blocks, d, 16 * d, 32, vocab, range(n_layers))["float32"]
    assert train == 2 * 6 * block + 6 * (2 * d * 16 * d + 8 * 32 * d)


def test_baseline_eval_runs(tmp_path):
    """The stand-in's eval mode (splices every layer to full logits) runs as the bench runs it:
    `python -m benchmarks.bench_baseline` in its own process (it sets threads and the seed)."""
    from benchmarks.bench import ROOT, TINY_SHAPE, make_model_dir

    model = make_model_dir(tmp_path / "model", TINY_SHAPE)
    cmd = [sys.executable, "-m", "benchmarks.bench_baseline", "--model", str(model)]
    cmd += ["--mode", "eval", "--batch-size", "1", "--max-length", "16", "--reps", "1"]
    cmd += ["--warmup", "0", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["name"] == "baseline/eval" and rec["tokens_per_s"] > 0


def test_peer_lines_run_each_tool_on_the_same_activations():
    """`--peers` smoke: every (line, side) ran, in its own process, and says what it computed;
    ratios are ours / peer. No timing assertions: the numbers are the benchmark's to print."""
    import math

    from benchmarks.peers import WIDE_EF, run

    recs = run(rounds=1, threads=1, quick=True)
    wide = f"mlsae-x{WIDE_EF}"
    assert {(r["name"], r["side"]) for r in recs} == {
        (f"peers/{line}/x16-k32", side)
        for line, ours in (("one-layer", ("mlsae",)), ("all-layers", ("mlsae", wide)))
        for side in (*ours, "sparsify", "saelens", "target")
    }
    for r in (r for r in recs if r["side"] != "target"):
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and math.isfinite(r["heldout_fvu"]) and r["computed"]
        assert ("ours_over_peer" in r) == (r["side"] in ("sparsify", "saelens"))
    assert f"width x{WIDE_EF}" in next(r["computed"] for r in recs if r["side"] == wide)
    for r in (r for r in recs if r["side"] == "target"):
        assert r["verdict"]


def test_peer_target_takes_the_faster_peer_and_our_fastest_side_at_equal_quality():
    """The target line, by hand on planted records: the faster peer (sparsify), and of our
    sides only those at least as good in held-out FVU; none good enough says so."""
    from benchmarks.peers import target_record

    name = "peers/all-layers/x16-k32"

    def rec(side, tok, fvu):
        return {"name": name, "side": side, "tokens_per_s": tok, "heldout_fvu": fvu}

    out = [rec("mlsae", 4000.0, 0.63), rec("mlsae-x36", 1500.0, 0.604),
           rec("sparsify", 1000.0, 0.6058), rec("saelens", 400.0, 0.89)]  # fmt: skip
    got = target_record(out, name)
    assert (got["peer"], got["ours"], got["ratio"]) == ("sparsify", "mlsae-x36", 1.5)
    assert got["verdict"].startswith("met: mlsae-x36 1.50x sparsify")
    out[1]["tokens_per_s"] = 1200.0
    assert target_record(out, name)["verdict"].startswith("missed: mlsae-x36 1.20x")
    out[1]["heldout_fvu"] = 0.61
    assert target_record(out, name)["verdict"].startswith("no side of ours reached sparsify")
