"""The benchmark's yardstick: how the original research code spends its compute, in plain torch.

`python -m benchmarks.bench` times our training and evaluation next to this module on the same
model directory, batch and thread count, and reports ours / baseline. Nothing else in the
project imports it. It reproduces the original's cost structure, not its training results:

* activations: the base model's forward with a hook on every block (no unembedding), all
  block outputs stacked into one [L, B, P, d] tensor;
* SAE step: a dense encoder GEMM, `torch.topk` then ReLU, whose backward scatters the gradient
  into a DENSE [N, n] latent tensor; decoding through a COO sparse matrix times the decoder,
  1024 rows at a time; FVU plus AuxK loss (dead latents counted in steps); decoder-gradient
  projection, column renormalisation and Adam;
* evaluation: for every layer, the rest of the model is run TWICE, once on the clean block
  output (the clean pass is re-run per layer) and once on the reconstruction, each to
  full-vocabulary logits, then CE, KL and logit MSE.

Usage (prints one JSON line with tokens_per_s and peak_rss_mb):
  python -m benchmarks.bench_baseline --model DIR --mode train|eval --expansion-factor 16 -k 32
      [--batch-size 4] [--max-length 256] [--reps 5] [--warmup 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

COO_ROWS = 1024  # rows per sparse decode, as the original
DEAD_STEPS = 100  # the original's step-counted dead threshold
_LAYOUTS = (  # (base model attribute, block list attribute, final norm attribute)
    ("gpt_neox", "layers", "final_layer_norm"),
    ("model", "layers", "norm"),
    ("transformer", "h", "ln_f"),
)


def locate(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module], Any]:
    """(base model, decoder blocks, final norm) of a GPT-NeoX, Llama or GPT-2 causal LM."""
    for base_attr, blocks_attr, norm_attr in _LAYOUTS:
        base = getattr(model, base_attr, None)
        if base is not None and hasattr(base, blocks_attr):
            return base, list(getattr(base, blocks_attr)), getattr(base, norm_attr)
    raise SystemExit(f"baseline: no known block layout in {type(model).__name__}")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Every block's output stacked [L, B, P, d], and the keyword arguments block 0 received
    (masks, position embeddings), which `run_from` needs to resume the model mid-way."""
    base, blocks, _ = locate(model)
    outs: list[torch.Tensor] = []
    block_kwargs: dict[str, Any] = {}
    handles = [
        blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: block_kwargs.update(kwargs), with_kwargs=True
        )
    ]
    handles += [b.register_forward_hook(lambda m, a, o: outs.append(_first(o))) for b in blocks]
    try:
        base(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs), block_kwargs


def run_from(blocks: list[torch.nn.Module], h: torch.Tensor, start: int, kw: dict) -> torch.Tensor:
    for block in blocks[start:]:
        h = _first(block(h, **kw))
    return h


class DenseTopKSAE(torch.nn.Module):
    """The original's TopK SAE: dense latents in the backward, COO sparse decode forward."""

    def __init__(self, d: int, n: int, k: int, auxk: int) -> None:
        super().__init__()
        self.n, self.k, self.auxk = n, k, auxk
        self.encoder = torch.nn.Linear(d, n, bias=False)
        self.decoder = torch.nn.Linear(n, d, bias=False)
        self.pre_encoder_bias = torch.nn.Parameter(torch.zeros(d))
        with torch.no_grad():
            # W_dec [d, n] is W_enc^T viewed column-major, so W_dec^T (the sparse mm's
            # right-hand side) is contiguous; columns scaled to unit norm.
            w = self.encoder.weight.detach().clone().t()
            w /= w.norm(dim=0)
            self.decoder.weight.data = w
        self.register_buffer("idle_steps", torch.zeros(n, dtype=torch.long))

    def coo_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j values[., j] * W_dec[:, indices[., j]] + b, via COO matrices of 1024 rows."""
        k = values.shape[-1]
        vals, idx = values.reshape(-1, k), indices.reshape(-1, k)
        parts = []
        for lo in range(0, vals.shape[0], COO_ROWS):
            v, i = vals[lo : lo + COO_ROWS], idx[lo : lo + COO_ROWS]
            rows = torch.arange(v.shape[0]).repeat_interleave(k)
            coo = torch.sparse_coo_tensor(
                torch.stack([rows, i.reshape(-1)]), v.reshape(-1), (v.shape[0], self.n)
            )
            parts.append(torch.sparse.mm(coo, self.decoder.weight.t()))
        return torch.cat(parts).reshape(*values.shape[:-1], -1) + self.pre_encoder_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in x's units, AuxK reconstruction of the error, standardized)."""
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        z = self.encoder((x - mu) / (sd + 1e-5) - self.pre_encoder_bias)  # dense [.., n]
        top = torch.topk(z, self.k, sorted=False)
        hits = (top.values > 1e-3).long().reshape(-1)
        fired = torch.zeros(self.n, dtype=torch.long).scatter_add_(0, top.indices.reshape(-1), hits)
        self.idle_steps = (self.idle_steps + 1) * (fired == 0)
        dead = self.idle_steps >= DEAD_STEPS
        recon = self.coo_decode(torch.relu(top.values), top.indices) * sd + mu
        aux = torch.topk(z * dead, self.auxk, sorted=False)
        return recon, self.coo_decode(torch.relu(aux.values), aux.indices)


def fvu(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The original's FVU: per-layer MSE over a scalar variance of all elements, averaged."""
    return ((r - x).pow(2).mean(dim=(1, 2, 3)) / x.var(dim=(1, 2, 3))).mean()


def train_step(
    model: torch.nn.Module, sae: DenseTopKSAE, opt: torch.optim.Optimizer, tokens: torch.Tensor
) -> float:
    """Activations, SAE forward/backward, decoder projection, Adam; returns the loss."""
    x, _ = block_outputs(model, tokens)
    recon, aux_recon = sae(x)
    err = x - recon
    aux = (err - aux_recon).pow(2).mean() / (err - err.mean(-1, keepdim=True)).pow(2).mean()
    loss = fvu(x, recon) + aux.nan_to_num(0) / 32
    loss.backward()
    w, g = sae.decoder.weight, sae.decoder.weight.grad
    w.data /= w.data.norm(dim=0)
    g -= w * (g * w).sum(0, keepdim=True)
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


@torch.no_grad()
def eval_step(model: torch.nn.Module, sae: DenseTopKSAE, tokens: torch.Tensor) -> torch.Tensor:
    """[L, 3] rows of (dCE, KL, logit MSE), splicing the reconstruction at each layer."""
    x, kw = block_outputs(model, tokens)
    recon, _ = sae(x)
    _, blocks, norm = locate(model)
    unembed = model.get_output_embeddings()
    targets = tokens[:, 1:].reshape(-1)
    rows = []
    for layer in range(len(blocks)):
        clean = unembed(norm(run_from(blocks, x[layer], layer + 1, kw)))
        spliced = unembed(norm(run_from(blocks, recon[layer], layer + 1, kw)))
        vocab = clean.shape[-1]
        ce_clean = F.cross_entropy(clean[:, :-1].reshape(-1, vocab), targets)
        ce_spliced = F.cross_entropy(spliced[:, :-1].reshape(-1, vocab), targets)
        kl = F.kl_div(
            F.log_softmax(clean, -1), F.log_softmax(spliced, -1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        rows.append(torch.stack([ce_spliced - ce_clean, kl, F.mse_loss(clean, spliced)]))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_baseline")
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--expansion-factor", type=int, default=16)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--auxk", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    d = model.config.hidden_size
    sae = DenseTopKSAE(d, d * a.expansion_factor, a.k, a.auxk)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    tokens = torch.randint(0, min(model.config.vocab_size, 49152), (a.batch_size, a.max_length))

    def step() -> None:
        if a.mode == "train":
            train_step(model, sae, opt, tokens)
        else:
            eval_step(model, sae, tokens)

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    config = {k: getattr(a, k) for k in ("expansion_factor", "k", "batch_size", "max_length")}
    rec = {
        "name": f"baseline/{a.mode}",
        "tokens_per_s": round(tokens.numel() / statistics.median(times), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": {**config, "threads": a.threads, "model": a.model},
    }
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
