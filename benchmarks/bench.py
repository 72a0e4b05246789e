"""Benchmark suite: `python -m benchmarks.bench [--quick] [--only NAME] [--json [PATH]]`.

Run as a script, never as timed tests. Every measurement runs in its OWN subprocess, so the
peak RSS (`ru_maxrss`) printed is that measurement's. The baseline, `benchmarks.bench_baseline`
(the original research code's compute pattern, beside it; `--baseline PATH` runs another
script with the same flags instead), runs in the same process tree on the same model directory
(random Pythia-70m-shaped weights from `mlsae_core.tiny`, saved once), the same batch shape and
the same thread count, and each pair reports ours / baseline.

Measurements (tokens/s = chunk positions per second, median of --reps after --warmup):
  train/<cfg>     one training step: activations + SAE forward/backward + Adam (train.py's step)
  sae-step/<cfg>  the SAE step alone on activations computed beforehand
  eval/<cfg>      evaluate(): metrics + dCE/KL/logit-MSE spliced at every layer (delta_dtype
                  "auto": the splice logit GEMM in bfloat16 where native)
  eval-exact/<cfg> the same with delta_dtype="float32" (the exact reference path)
  analysis/<cfg>  evaluate() with the analysis collectors (LayerDists, MaxExamples) riding along
  extract/<model> activation extraction (every block output, no unembedding)
  train-run/<cfg> with --train-run N: `train()` itself, end to end, for an N-token budget of
                  random chunks (checkpoints, history, dead-latent counters), timed once
  peers/<line>    with --peers (instead of the above): the same TopK SAE training done by
                  sparsify and SAELens on the same activations (benchmarks/peers.py); it takes
                  --rounds, --threads, --quick, --device and --json, and refuses the other flags
SmolLM2 (30 layers, d=576) runs the same lines on fewer tokens, when its converted copy exists.
With --device cuda our lines run on the GPU (timed after torch.cuda.synchronize, with the
GPU's peak allocation as peak_gpu_mb) and the CPU-only baseline is not run.

Precision: the train, sae-step and extract lines run in training's `--precision` (default auto:
bfloat16 where native), as `mlsae train` does; the eval lines are float32 but for the splice GEMM.

Roofline: the run first times a GEMM per dtype its lines use (`peak/<dtype>`: float32, and
bfloat16 where "auto" or --precision resolves to it), with the same thread count, so
every line can say what fraction of this machine's peak it reaches *now* (a loaded machine
lowers both). Each line carries `flops_per_token` from `line_flops` (the cost model, documented
there and in docs/performance.md), `achieved_gflops` and `peak_fraction` against the peak of its
`peak_dtype`; the baseline's side of a pair is scored with the same cost model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE_MODULE = "benchmarks.bench_baseline"
# `mlsae_core.tiny.tiny_model("gpt_neox", ...)` arguments for the benchmark's two model shapes.
PYTHIA_70M_SHAPE = dict(
    n_layers=6,
    d=512,
    vocab=50304,
    max_positions=2048,
    num_attention_heads=8,
    intermediate_size=2048,
)
TINY_SHAPE = dict(n_layers=2, d=32, vocab=512, max_positions=128)
# Pythia-architecture pairs with the baseline: (name, kind, expansion factor, k, baseline mode)
PAIRS = (
    ("train/x16-k32", "train", 16, 32, "train"),
    ("train/x64-k32", "train", 64, 32, "train"),
    ("eval/x16-k32", "eval", 16, 32, "eval"),
)
SOLO = (
    ("eval-exact/x16-k32", "eval-exact", 16, 32),
    ("sae-step/x16-k32", "sae-step", 16, 32),
    ("sae-step/x64-k32", "sae-step", 64, 32),
    ("analysis/x16-k32", "analysis", 16, 32),
    ("extract/pythia70m-arch", "extract", 16, 32),
)
SMOL = (
    ("smollm2/train/x16-k32", "train", 16, 32),
    ("smollm2/sae-step/x16-k32", "sae-step", 16, 32),
    ("smollm2/eval/x16-k32", "eval", 16, 32),
    ("smollm2/analysis/x16-k32", "analysis", 16, 32),
    ("smollm2/extract", "extract", 16, 32),
)


# Line kinds whose splice GEMM follows evaluate()'s delta_dtype="auto" (eval-exact is float32).
AUTO_DELTA_KINDS = ("eval", "analysis")
# Line kinds that run in training's --precision.
LOW_KINDS = ("train", "sae-step", "extract", "train-run")
CUDA_PEAK_SHAPE = (8192, 8192, 8192)  # a GPU needs a large GEMM to approach its peak


def line_flops(
    kind: str,
    block_params: Sequence[int],
    d: int,
    n_latents: int,
    k: int,
    vocab: int,
    layers: Sequence[int],
    splice_dtype: str = "float32",
    train_dtype: str = "float32",
) -> dict[str, int]:
    """FLOPs per token position of one line, by GEMM dtype: the work the algorithm must do.

    A roofline needs a FLOP count independent of how fast the code is, so this counts
    multiply-adds (2 FLOPs each) of the GEMM-shaped work and nothing elementwise:
      transformer forward  2 * (non-embedding params of blocks 0..last needed); the final norm,
                           attention scores and the embedding lookup are not counted
      SAE encoder          2*d*n per vector per layer (the dense GEMM the TopK selects from;
                           the TopK itself is comparisons, 0 FLOPs)
      sparse decode        2*k*d per vector per layer (k gathered decoder rows)
      SAE backward         6*k*d per vector per layer: decoder weight grad, latent value grad and
                           encoder weight grad are each k-sparse (2*k*d); the input needs no
                           grad. Not 2x the forward: a dense backward (the baseline's) is waste
      unembedding          2*d*vocab per token, per use
    train:    transformer up to max(layers) + per layer SAE forward + backward; under a
              mixed `train_dtype` (--precision) the transformer and the encoder GEMM count in
              that dtype, the sparse decode and backward in float32
    sae-step: the SAE part of train only
    extract:  the transformer part of train only (in `train_dtype`)
    eval/analysis/eval-exact: the clean pass (every block + one float32 unembedding), the SAE
              encode + decode per layer, and per spliced layer l the blocks after l rerun plus
              one unembedding of the state difference in `splice_dtype`
    The Adam update (per step, not per token), losses, AuxK (dead latents only) and the
    collectors' bookkeeping are not counted. Tokens are all batch positions, as tokens_per_s.
    """
    layers = list(layers)
    n_sae = len(layers)
    encode = 2 * d * n_latents + 2 * k * d
    upto = 2 * sum(block_params[: max(layers) + 1])
    if kind == "train-run":
        kind = "train"
    if kind in LOW_KINDS:
        low = {"transformer": upto if kind != "sae-step" else 0, "encoder": 0}
        if kind != "extract":
            low["encoder"] = n_sae * 2 * d * n_latents
        fp32 = 0 if kind == "extract" else n_sae * (2 * k * d + 6 * k * d)
        out: dict[str, int] = {}
        for dtype, flops in ((train_dtype, sum(low.values())), ("float32", fp32)):
            if flops:
                out[dtype] = out.get(dtype, 0) + flops
        return out
    if kind in ("eval", "eval-exact", "analysis"):
        unembed = 2 * d * vocab
        reruns = sum(2 * sum(block_params[layer + 1 :]) for layer in layers)
        fp32 = 2 * sum(block_params) + unembed + n_sae * encode + reruns
        out = {"float32": fp32}
        out[splice_dtype] = out.get(splice_dtype, 0) + n_sae * unembed
        return out
    raise ValueError(f"unknown measurement kind {kind!r}")


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def roofline(rec: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """Add achieved_gflops / peak_fraction (and the baseline's) to a line with a cost.

    peak_dtype is the dtype whose FLOPs would take longest at its measured peak, i.e. the one
    that bounds the line (on a CPU with native bf16 the float32 part of eval, not the bf16
    splice GEMMs that have more FLOPs but run ~5x faster).
    """
    by = rec.get("flops_by_dtype")
    if not by or not rec.get("tokens_per_s"):
        return rec
    have = [dt for dt in by if peaks.get(dt)]
    fpt = rec["flops_per_token"]
    rec["achieved_gflops"] = _sig(fpt * rec["tokens_per_s"] / 1e9)
    if not have:
        rec["peak_note"] = f"no peak measured for {sorted(by)}"
        return rec
    dt = max(have, key=lambda t: by[t] / peaks[t])
    rec["peak_dtype"] = dt
    rec["peak_fraction"] = _sig(rec["achieved_gflops"] / peaks[dt])
    if rec.get("baseline_tokens_per_s"):
        rec["baseline_achieved_gflops"] = _sig(fpt * rec["baseline_tokens_per_s"] / 1e9)
        rec["baseline_peak_fraction"] = _sig(rec["baseline_achieved_gflops"] / peaks[dt])
    return rec


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----- the worker: one measurement in this process -------------------------------------------
def _load(spec: dict[str, Any]):
    import torch

    from mlsae_core.transformer import Transformer

    device = spec.get("device", "cpu")
    if spec["model"] == "smollm2":
        return Transformer.load("smollm2", device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return Transformer.from_model(model.to(device), None, name=Path(spec["model"]).name)


def _tokens(tr: Any, spec: dict[str, Any]):
    import torch

    g = torch.Generator().manual_seed(0)
    hi = min(tr.vocab_size, 49152)  # as the baseline: ids below 49152
    tokens = torch.randint(0, hi, (spec["batch_size"], spec["max_length"]), generator=g)
    special = list(tr.special_token_ids)
    masks = torch.ones_like(tokens, dtype=torch.bool)
    for t in special:
        masks &= tokens != t
    return tokens, masks


def _collectors(tr: Any, sae: Any, layers: list[int]) -> tuple[list[Any], str | None]:
    """The analysis collectors, if the analysis package provides them yet."""
    try:
        from mlsae_core.analysis.dists import LayerDists
        from mlsae_core.analysis.examples import MaxExamples
    except ImportError as exc:
        return [], f"analysis collectors not importable ({exc})"
    out = []
    for cls in (LayerDists, MaxExamples):
        for args in ((sae.n_latents, layers), (sae.n_latents, len(layers))):
            try:
                out.append(cls(*args))
                break
            except TypeError:
                continue
        else:
            return [], f"could not construct {cls.__name__}"
    return out, None


def peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Best-of-reps GFLOP/s of one [m x k] @ [k x n] GEMM in `spec["dtype"]` ("auto": the
    dtype evaluate()'s delta_dtype="auto" resolves to here) at the suite's thread count."""
    import torch

    from mlsae_core.evaluate import resolve_delta_dtype

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    if spec["dtype"] == "auto":
        dtype = resolve_delta_dtype("auto", device)
    else:
        dtype = getattr(torch, spec["dtype"])
    m, kk, n = spec["shape"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, kk, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(kk, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=c)
    sync()
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "gflops": round(2 * m * kk * n / min(times) / 1e9, 1),
        "shape": [m, kk, n],
        "peak_rss_mb": peak_rss_mb(),
        "times_s": [round(t, 5) for t in times],
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "peak":
        return peak_worker(spec)
    import torch

    from mlsae_core.config import SAEConfig
    from mlsae_core.evaluate import evaluate, resolve_delta_dtype
    from mlsae_core.losses import total_loss
    from mlsae_core.precision import autocast, dtype_name, resolve_precision
    from mlsae_core.sae import MLSAE
    from mlsae_core.train import LiveActivations, make_optimizer, optimizer_step

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    tr = _load(spec)
    tokens, masks = _tokens(tr, spec)
    layers = list(range(tr.n_layers))
    torch.manual_seed(0)
    d = tr.d_model
    sae_cfg = SAEConfig(expansion_factor=spec["expansion_factor"], k=spec["k"])
    sae = MLSAE.from_config(d, sae_cfg).to(device)
    opt = make_optimizer(sae, 1e-4, 6.25e-10)
    source = LiveActivations(tr, tokens, layers)
    rows = torch.arange(tokens.shape[0])
    note = None
    kind = spec["kind"]
    delta_name = "float32"
    # train.py's mixed precision: the transformer forward and the encoder GEMM in `low`
    low = resolve_precision(spec.get("precision", "auto"), device)
    train_name = dtype_name(low)
    if kind in LOW_KINDS:
        note = f"precision={train_name}"

    def sae_step(x: torch.Tensor) -> None:
        with autocast(device, low):
            out = sae(x)
        loss, _, _ = total_loss(x, out, 1 / 32)
        loss.backward()
        optimizer_step(sae, opt)
        sae.update_dead(out.fired, x.shape[1])

    if kind == "train":

        def step() -> None:
            with autocast(device, low):
                acts = source(rows)
            x = acts[:, masks.to(device)].float().to(device)  # [L, N, d]
            sae_step(x)

    elif kind == "sae-step":
        with autocast(device, low):
            x_fixed = source(rows)[:, masks.to(device)].float().to(device)

        def step() -> None:
            sae_step(x_fixed)

    elif kind in ("eval", "eval-exact", "analysis"):
        collectors: list[Any] = []
        if kind == "analysis":
            collectors, note = _collectors(tr, sae, layers)
            if note is not None:
                return {"skipped": True, "note": note}
        delta = "float32" if kind == "eval-exact" else "auto"
        delta_name = str(resolve_delta_dtype(delta, device)).removeprefix("torch.")
        note = f"delta_dtype={delta_name}"

        def step() -> None:
            evaluate(
                tr, sae, tokens, masks, layers, batch_size=tokens.shape[0], collectors=collectors,
                progress=False, delta_dtype=delta,
            )  # fmt: skip

    elif kind == "train-run":
        return _train_run(spec, tr, sae_cfg, low, device)

    elif kind == "extract":

        def step() -> None:
            with autocast(device, low):
                tr.activations(tokens, layers)

    else:
        raise ValueError(f"unknown measurement kind {kind!r}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(spec["warmup"]):
        step()
    sync()
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    n_tokens = tokens.numel()
    block_params = [sum(p.numel() for p in block.parameters()) for block in tr.blocks]
    flops = line_flops(
        kind, block_params, d, sae.n_latents, spec["k"], tr.vocab_size, layers, delta_name,
        train_name,
    )  # fmt: skip
    out = {
        "tokens_per_s": round(n_tokens / statistics.median(times), 1),
        "peak_rss_mb": peak_rss_mb(),
        "times_s": [round(t, 4) for t in times],
        "flops_per_token": sum(flops.values()),
        "flops_by_dtype": flops,
    }
    if cuda:
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(device)
    if note is not None:
        out["note"] = note
    return out


def _train_run(spec: dict[str, Any], tr: Any, sae_cfg: Any, low: Any, device: Any) -> dict:
    """`train()` for spec["train_tokens"] tokens of random chunks, in a scratch directory."""
    import torch

    from mlsae_core.config import TrainConfig
    from mlsae_core.precision import dtype_name
    from mlsae_core.train import LiveActivations, train

    budget = int(spec["train_tokens"])
    per_micro = spec["batch_size"] * spec["max_length"]
    n_rows = -(-budget // spec["max_length"])
    tokens, masks = _tokens(tr, {**spec, "batch_size": n_rows})  # the lines' random chunks
    layers = list(range(tr.n_layers))
    cfg = TrainConfig(accumulate_grad_batches=1, checkpoint_every=10**9,
                      device=device.type, precision=dtype_name(low))  # fmt: skip
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="mlsae-train-run-") as out:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train(LiveActivations(tr, tokens, layers), masks, sae_cfg, cfg, out,
              batch_size=spec["batch_size"], max_tokens=budget, progress=False)  # fmt: skip
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    steps = -(-budget // per_micro)
    rate = steps * per_micro / seconds
    block_params = [sum(p.numel() for p in block.parameters()) for block in tr.blocks]
    flops = line_flops("train", block_params, tr.d_model, sae_cfg.n_latents(tr.d_model),
                       sae_cfg.k, tr.vocab_size, layers, "float32", dtype_name(low))  # fmt: skip
    out_rec = {
        "tokens_per_s": round(rate, 1),
        "peak_rss_mb": peak_rss_mb(),
        "times_s": [round(seconds, 2)],
        "train_tokens": steps * per_micro,
        "projected_1b_tokens_min": round(1e9 / rate / 60, 1),
        "flops_per_token": sum(flops.values()),
        "flops_by_dtype": flops,
        "note": f"precision={dtype_name(low)}",
    }
    if cuda:
        out_rec["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out_rec["gpu"] = torch.cuda.get_device_name(device)
    return out_rec


# ----- the driver ------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cmd_threads(cmd))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from repeated subprocess runs: median tokens/s, max peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(ok[0])
    out["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in ok), 1)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    if len(ok) > 1:
        out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
    out.pop("name", None)
    out.pop("config", None)
    return out


def cmd_threads(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--threads") + 1]) if "--threads" in cmd else 2


def make_model_dir(out: Path, shape: dict[str, Any]) -> Path:
    """A GPT-NeoX model with the given shape and seed-0 random weights, saved to `out`.

    Pythia's rotary fraction and token ids (bos = eos = 0, no pad), no tokenizer: the
    benchmark feeds random ids and both sides load the directory with `from_pretrained`.
    """
    from mlsae_core.tiny import tiny_model

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=None)
    tiny_model("gpt_neox", **shape, seed=0, rotary_pct=0.25, **ids).save_pretrained(out)
    return out


def _smollm2_available() -> bool:
    from mlsae_core.layout import StorageLayout
    from mlsae_core.transformer import SMOLLM2_DIR_NAME

    return (StorageLayout.from_env().models_dir / SMOLLM2_DIR_NAME / "config.json").is_file()


# The flags of the lines above that --peers (its own training, benchmarks/peers.py) does not use.
PEERS_IGNORE = ("only", "reps", "warmup", "batch_size", "max_length", "baseline", "no_baseline",
                "no_smollm2", "tiny", "precision", "train_run")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="reps 2, warmup 1, fewer SmolLM2 tokens")
    p.add_argument("--only", action="append", default=[], help="run names containing this")
    p.add_argument("--reps", type=int, default=5, help="(default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="(default: 1)")
    p.add_argument("--threads", type=int, default=2, help="(default: 2)")
    p.add_argument(
        "--rounds", type=int, default=1, help="alternate ours/baseline N times (default: 1)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="(default: 4)")
    p.add_argument("--max-length", type=int, default=256, help="(default: 256)")
    p.add_argument(
        "--json", nargs="?", const="-", default=None,
        help="JSON lines to PATH, or to stdout instead of the text lines (default: text only)",
    )  # fmt: skip
    p.add_argument(
        "--baseline", type=Path, default=None,
        help=f"a baseline script with {BASELINE_MODULE}'s flags (default: that module)",
    )  # fmt: skip
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests only)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (cuda: ours only; the baseline is CPU-only) (default: cpu)",
    )
    p.add_argument(
        "--precision", default="auto", choices=("auto", "float32", "bfloat16"),
        help="train/sae-step/extract lines: training's --precision (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--train-run", type=int, default=0, metavar="N",
        help="also time train() end to end for N tokens (line train-run/x64-k32)",
    )  # fmt: skip
    p.add_argument(
        "--peers", action="store_true",
        help="instead: the same SAE training by sparsify and SAELens (benchmarks/peers.py)",
    )  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.peers:
        ignored = [
            f"--{d.replace('_', '-')}" for d in PEERS_IGNORE if getattr(a, d) != p.get_default(d)
        ]
        if ignored:
            p.error(f"--peers does not use {', '.join(ignored)}; drop them")
    json_out = open(a.json, "w") if a.json and a.json != "-" else None  # noqa: SIM115

    def write(rec: dict[str, Any], text: str) -> None:
        """The record as text, or as a JSON line on stdout (--json); also to --json PATH."""
        line = json.dumps(rec)
        if json_out is not None:
            json_out.write(line + "\n")
            json_out.flush()
        print(line if a.json == "-" else text, flush=True)

    if a.peers:
        from benchmarks.peers import format_line, run

        for rec in run(a.rounds, a.threads, a.quick, a.device):
            write(rec, format_line(rec))
        if json_out is not None:
            json_out.close()
        return 0
    if a.quick:
        a.reps, a.warmup = min(a.reps, 2), 1

    def wanted(name: str) -> bool:
        return not a.only or any(o in name for o in a.only)

    results: list[dict[str, Any]] = []
    peaks: dict[str, float] = {}  # dtype -> GFLOP/s, measured first in this run

    def emit(rec: dict[str, Any]) -> None:
        roofline(rec, peaks)
        results.append(rec)
        write(rec, _format(rec))

    base_spec = dict(
        threads=a.threads, reps=a.reps, warmup=a.warmup, device=a.device, precision=a.precision
    )
    if a.device != "cpu":
        a.no_baseline = True
    with tempfile.TemporaryDirectory(prefix="mlsae-bench-") as tmp:
        model_dir = make_model_dir(Path(tmp) / "model", TINY_SHAPE if a.tiny else PYTHIA_70M_SHAPE)
        shape = dict(batch_size=a.batch_size, max_length=a.max_length)
        model_label = "tiny-gpt-neox" if a.tiny else "pythia-70m-arch (random weights)"
        me = [sys.executable, "-m", "benchmarks.bench", "--threads", str(a.threads), "--worker"]
        # The peaks first, each in its own worker like every line: float32 always, and the
        # dtype of delta_dtype="auto" when a line that uses it is selected.
        with_smol = not a.no_smollm2 and not a.tiny
        lines = [(n, kd) for n, kd, *_ in (*PAIRS, *SOLO, *(SMOL if with_smol else ()))]
        peak_dtypes = ["float32"]
        if any(wanted(n) and kd in AUTO_DELTA_KINDS for n, kd in lines):
            peak_dtypes.append("auto")
        low_lines = a.train_run or any(wanted(n) and kd in LOW_KINDS for n, kd in lines)
        if a.precision != "float32" and low_lines:
            peak_dtypes.append(a.precision)
        d_model = (TINY_SHAPE if a.tiny else PYTHIA_70M_SHAPE)["d"]
        # CPU: the x16 encoder GEMM at the bench's batch, [tokens x d] @ [d x 16d].
        peak_shape = (
            CUDA_PEAK_SHAPE
            if a.device != "cpu"
            else (a.batch_size * a.max_length, d_model, 16 * d_model)
        )
        for dt in peak_dtypes:
            spec = dict(base_spec, kind="peak", dtype=dt, shape=peak_shape, reps=max(3, a.reps))
            r = _run([*me, json.dumps(spec)])
            if "error" not in r and r["dtype"] in peaks:
                continue  # "auto" resolved to float32 here: already measured
            if "error" not in r:
                peaks[r["dtype"]] = r["gflops"]
            emit({"name": f"peak/{r.get('dtype', dt)}", "config": spec, **r})
        if a.baseline is None:
            base_cmd = [sys.executable, "-m", BASELINE_MODULE]
        else:
            base_cmd = [sys.executable, str(a.baseline)]
        for name, kind, ef, k, mode in PAIRS:
            if not wanted(name):
                continue
            spec = dict(
                base_spec, **shape, model=str(model_dir), kind=kind, expansion_factor=ef, k=k
            )
            rec = {"name": name, "config": {**spec, "model": model_label}}
            cmd = [
                *base_cmd, "--model", str(model_dir), "--mode", mode,
                "--expansion-factor", str(ef), "-k", str(k), "--batch-size",
                str(a.batch_size), "--max-length", str(a.max_length), "--reps",
                str(a.reps), "--warmup", str(a.warmup), "--threads", str(a.threads),
            ]  # fmt: skip
            run_base = not a.no_baseline and (a.baseline is None or a.baseline.is_file())
            if not a.no_baseline and not run_base:
                rec["baseline_note"] = f"baseline script {a.baseline} not found"
            ours, base = [], []
            # Alternate ours/baseline --rounds times: a load spike from elsewhere then hits
            # both sides rather than one; each side reports its median over rounds.
            for _ in range(a.rounds):
                ours.append(_run([*me, json.dumps(spec)]))
                if run_base:
                    base.append(_run(cmd))
            rec.update(_median_record(ours))
            if run_base:
                b = _median_record(base)
                if "error" in b:
                    rec["baseline_error"] = b["error"]
                else:
                    rec["baseline_tokens_per_s"] = b["tokens_per_s"]
                    rec["baseline_peak_rss_mb"] = b["peak_rss_mb"]
                    if rec.get("tokens_per_s"):
                        rec["ratio"] = round(rec["tokens_per_s"] / b["tokens_per_s"], 2)
                        rec["rss_ratio"] = round(rec["peak_rss_mb"] / b["peak_rss_mb"], 2)
            emit(rec)
        for name, kind, ef, k in SOLO:
            if not wanted(name):
                continue
            spec = dict(
                base_spec, **shape, model=str(model_dir), kind=kind, expansion_factor=ef, k=k
            )
            rec = {"name": name, "config": {**spec, "model": model_label}}
            rec.update(_run([*me, json.dumps(spec)]))
            emit(rec)
        if a.train_run:
            name = "train-run/x64-k32"
            spec = dict(base_spec, **shape, model=str(model_dir), kind="train-run",
                        expansion_factor=64, k=32, train_tokens=a.train_run)  # fmt: skip
            rec = {"name": name, "config": {**spec, "model": model_label}}
            rec.update(_run([*me, json.dumps(spec)]))
            emit(rec)
        if not a.no_smollm2 and not a.tiny and any(wanted(s[0]) for s in SMOL):
            if not _smollm2_available():
                emit({"name": "smollm2", "skipped": True, "note": "data/models lacks SmolLM2"})
            else:
                smol_shape = dict(batch_size=1, max_length=128 if a.quick else 256)
                for name, kind, ef, k in SMOL:
                    if not wanted(name):
                        continue
                    spec = dict(
                        base_spec,
                        **smol_shape,
                        model="smollm2",
                        kind=kind,
                        expansion_factor=ef,
                        k=k,
                    )
                    rec = {"name": name, "config": spec}
                    rec.update(_run([*me, json.dumps(spec)]))
                    emit(rec)
    if json_out is not None:
        json_out.close()
    return 1 if any("error" in r for r in results) else 0


def _format(rec: dict[str, Any]) -> str:
    if rec.get("skipped"):
        return f"{rec['name']:<28} skipped: {rec.get('note')}"
    if "error" in rec:
        return f"{rec['name']:<28} ERROR {rec['error'][-300:]}"
    if "gflops" in rec:
        m, k, n = rec["shape"]
        return (
            f"{rec['name']:<28} {rec['gflops']:>9.1f} GFLOP/s  [{m}x{k} @ {k}x{n} GEMM, "
            f"best of {len(rec['times_s'])}]"
        )
    s = f"{rec['name']:<28} {rec['tokens_per_s']:>9.1f} tok/s  peak {rec['peak_rss_mb']:>7.1f} MB"
    if "peak_gpu_mb" in rec:
        s += f" (GPU {rec['peak_gpu_mb']:.1f} MB)"
    if "baseline_tokens_per_s" in rec:
        s += (
            f" | baseline {rec['baseline_tokens_per_s']:>7.1f} tok/s {rec['baseline_peak_rss_mb']:>7.1f} MB"
            f" | ratio {rec.get('ratio', float('nan')):.2f}x"
        )
    if "achieved_gflops" in rec:
        s += f" | {rec['flops_per_token'] / 1e6:.4g} MFLOP/tok {rec['achieved_gflops']:.4g} GFLOP/s"
        if "peak_fraction" in rec:
            s += f" = {rec['peak_fraction']:.1%} of {rec['peak_dtype']} peak"
        if "baseline_achieved_gflops" in rec:
            s += (
                f" (baseline {rec['baseline_achieved_gflops']:.4g} GFLOP/s"
                f" = {rec['baseline_peak_fraction']:.1%})"
            )
    if rec.get("note"):
        s += f"  [{rec['note']}]"
    return s


if __name__ == "__main__":
    sys.exit(main())
