"""float32 vs bfloat16 training at equal token budgets: final FVU and dCE over seeds.

    python -m scripts.precision_quality [--seeds 0 1 2] [--max_tokens 65536] [--models smollm2 pythia]

For each model and seed, one MLSAE is trained per precision with `mlsae_core.train.train` on
the Brown corpus's training documents (the same chunks, order and initialisation for a seed:
only `TrainConfig.precision` differs; the seed varies the initialisation), then evaluated on held-out documents by `evaluate()` in
float32 with the exact splice GEMM (delta_dtype=float32), so any gap is training's. Models:
`smollm2` (SmolLM2-135M, from `mlsae prepare`) and `pythia` (the benchmark's random-weight
Pythia-70m-shaped model, fed Brown tokenised by SmolLM2's tokenizer; its ids fit the vocab).
Prints one row per run and a markdown table of the relative gaps (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench import PYTHIA_70M_SHAPE, make_model_dir
from mlsae_core.config import DataConfig, SAEConfig, TrainConfig
from mlsae_core.data import corpus_split
from mlsae_core.evaluate import evaluate
from mlsae_core.train import LiveActivations, read_history, train
from mlsae_core.transformer import Transformer

SETTINGS = {  # model -> (expansion factor, k): the bench's x16 k32 where it fits the time
    "smollm2": (4, 32),
    "pythia": (16, 32),
}


def load(model: str, tmp: Path) -> Transformer:
    smol = Transformer.load("smollm2", device="cpu")
    if model == "smollm2":
        return smol
    from transformers import AutoModelForCausalLM

    path = make_model_dir(tmp / "pythia", PYTHIA_70M_SHAPE)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return Transformer.from_model(hf, smol.tokenizer, name="pythia-70m-arch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_tokens", type=int, default=32_768, help="training tokens per run")
    p.add_argument("--eval_tokens", type=int, default=4_096, help="held-out tokens (FVU)")
    p.add_argument("--splice_tokens", type=int, default=1_024, help="of those, with dCE")
    p.add_argument("--max_length", type=int, default=256)
    a = p.parse_args(argv)
    data = DataConfig(dataset="brown", max_length=a.max_length, batch_size=4,
                      max_tokens=a.max_tokens)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlsae-precision-") as tmp_name:
        tmp = Path(tmp_name)
        for model in a.models:
            tr = load(model, tmp)
            ef, k = SETTINGS[model]
            layers = list(range(tr.n_layers))
            # one document split (seed 0) for every run; the seeds vary the initialisation
            test = corpus_split(data, 0, "test", a.eval_tokens, tr.tokenizer, tr.max_context)
            chunks = corpus_split(data, 0, "train", a.max_tokens, tr.tokenizer, tr.max_context)
            for seed in a.seeds:
                for precision in ("float32", "bfloat16"):
                    out = tmp / f"{model}-{seed}-{precision}"
                    cfg = TrainConfig(lr=1e-3, accumulate_grad_batches=2, seed=seed,
                                      device="cpu", precision=precision)  # fmt: skip
                    t0 = time.perf_counter()
                    sae = train(
                        LiveActivations(tr, chunks.tokens, layers), chunks.mask(),
                        SAEConfig(expansion_factor=ef, k=k), cfg, out,
                        batch_size=data.batch_size, max_tokens=a.max_tokens, progress=False,
                    )  # fmt: skip
                    train_s = time.perf_counter() - t0
                    res = evaluate(tr, sae, test.tokens, test.mask(), layers, batch_size=4,
                                   progress=False, delta_dtype="float32",
                                   splice_max_tokens=a.splice_tokens)  # fmt: skip
                    avg = next(r for r in res.rows if r["layer"] == "avg")
                    row = dict(model=model, seed=seed, precision=precision, fvu=avg["fvu"],
                               dce=avg["dce"], kl=avg["kl"], ce_clean=avg["ce_clean"],
                               train_fvu=read_history(out)[-1]["fvu"],
                               train_s=round(train_s, 1))  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
    print("\n| model | x, k | seed | FVU float32 | FVU bfloat16 | gap | dCE float32 | "
          "dCE bfloat16 | gap | KL float32 | KL bfloat16 | gap | train s fp32 / bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gaps: dict[str, list[float]] = {}
    for model in a.models:
        for seed in a.seeds:
            f, b = (next(r for r in rows if (r["model"], r["seed"], r["precision"]) ==
                         (model, seed, pr)) for pr in ("float32", "bfloat16"))  # fmt: skip
            g_fvu = (b["fvu"] - f["fvu"]) / f["fvu"]
            g_dce = (b["dce"] - f["dce"]) / f["dce"]
            g_kl = (b["kl"] - f["kl"]) / f["kl"]
            gaps.setdefault(model, []).extend([abs(g_fvu), abs(g_dce), abs(g_kl)])
            ef, k = SETTINGS[model]
            print(f"| {model} | x{ef} k{k} | {seed} | {f['fvu']:.4f} | {b['fvu']:.4f} | "
                  f"{g_fvu:+.2%} | {f['dce']:.4f} | {b['dce']:.4f} | {g_dce:+.2%} | "
                  f"{f['kl']:.5f} | {b['kl']:.5f} | {g_kl:+.2%} | "
                  f"{f['train_s']} / {b['train_s']} |")  # fmt: skip
    for model, g in gaps.items():
        print(f"{model}: largest |gap| {max(g):.2%}, median {statistics.median(g):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
