"""The training loop, visible in one function (`train`): accumulate, project, step, renormalise.

Resumable by construction: the data order is a pure function of (seed, step), so a checkpoint
only needs the weights, the optimiser state, the dead-latent counters and the step number.
Resuming from any checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mlsae_core import atomic
from mlsae_core.checkpoint import CheckpointError, load_weights
from mlsae_core.config import SAEConfig, TrainConfig, resolve_device
from mlsae_core.lock import output_lock
from mlsae_core.losses import total_loss
from mlsae_core.precision import autocast, dtype_name, resolve_precision
from mlsae_core.sae import MLSAE

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
STATE_TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
HISTORY_NAME = "history.parquet"


class TrainingDiverged(RuntimeError):
    """Loss or weights became NaN/Inf; the last good checkpoint is kept."""


class ActivationSource(Protocol):
    """Residual-stream activations for rows of the token chunks, `[n_layers, rows, pos, d]`."""

    n_layers: int
    d_model: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LiveActivations:
    """Activations computed on the fly by the transformer (one forward per batch)."""

    transformer: Any
    tokens: torch.Tensor  # [n_chunks, pos]
    layers: Sequence[int] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers) if self.layers is not None else self.transformer.n_layers

    @property
    def d_model(self) -> int:
        return self.transformer.d_model

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        toks = self.tokens[rows].to(self.transformer.device)
        return self.transformer.activations(toks, self.layers)


class RowOrder:
    """The order chunk rows are trained in: the corpus order in the first epoch (a local
    corpus's documents are already shuffled with the seed), a fresh seeded permutation in each
    later one. The first epoch being a prefix of any longer one is what makes extending a run
    with a larger budget equal to one longer run."""

    def __init__(self, n_rows: int, seed: int) -> None:
        if n_rows < 1:
            raise ValueError("no token chunks to train on: the training split is empty")
        self.n_rows, self.seed = n_rows, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch == 0:
            return torch.arange(self.n_rows)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_rows, generator=gen)}
        return self._perms[epoch]

    def rows(self, start: int, count: int) -> torch.Tensor:
        out = []
        for i in range(start, start + count):
            out.append(self._perm(i // self.n_rows)[i % self.n_rows])
        return torch.stack(out)


def make_optimizer(sae: MLSAE, lr: float, eps: float) -> torch.optim.Adam:
    """Adam(lr, eps) over the SAE's parameters, fused (one kernel per parameter) where the
    installed torch supports it for the device, else the plain implementation.

    Fused Adam applies the same update formula as the plain one (tests/test_sparse.py checks
    they agree to float32 rounding). Every parameter is updated every step: the TopK gradient
    is row-sparse, but Adam with a zero gradient still decays its moments and moves the
    weight, so a "sparse Adam" would change the maths; with batches of thousands of tokens
    nearly every latent is touched anyway (see docs/performance.md).
    """
    params = list(sae.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.Adam(params, lr=lr, eps=eps)


def optimizer_step(sae: MLSAE, opt: torch.optim.Optimizer) -> None:
    """Project the decoder gradient, step, clear gradients, renormalise the decoder."""
    sae.project_decoder_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()


# ----- distributed helpers ------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world_size); initialises torch.distributed under torchrun (gloo on CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _broadcast_params(sae: MLSAE) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in sae.parameters():
            dist.broadcast(p.data, src=0)


# ----- checkpoint state ---------------------------------------------------------------------
def _save_state(
    directory: Path,
    sae: MLSAE,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """weights + optimiser tensors + JSON scalars + the history up to this step, committed as
    one atomic directory: a resume never loses or duplicates training-curve rows."""
    from safetensors.torch import save_file

    opt_sd = opt.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    for pid, pstate in opt_sd["state"].items():
        for key, value in pstate.items():
            opt_tensors[f"{pid}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    with atomic.atomic_dir(directory) as tmp:
        tensors = sae.weights_dict()
        tensors["tokens_since_fired"] = sae.tokens_since_fired.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        sums = {name: atomic.sha256_file(tmp / name) for name in STATE_TENSOR_FILES}
        meta = {**state, "param_groups": opt_sd["param_groups"], "sha256": sums}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        _write_history(tmp / HISTORY_NAME, history)


def _load_state(directory: Path, sae: MLSAE, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((directory / "state.json").read_text())
    for name, want in meta.pop("sha256", {}).items():  # states written before have none
        if atomic.sha256_file(directory / name) != want:
            raise CheckpointError(
                f"{directory / name} does not match the checksum in state.json (truncated or "
                f"modified); delete {directory} to restart the run, or restore it"
            )
    tensors = load_file(str(directory / "model.safetensors"))
    sae.tokens_since_fired.copy_(tensors.pop("tokens_since_fired"))
    load_weights(sae, tensors)
    opt_tensors = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in opt_tensors.items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    # Moments are saved contiguous; give them back their parameter's memory layout (the
    # decoder weight is stored transposed), as a fused kernel walks param and state together.
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if value.shape == param.shape and value.stride() != param.stride():
                    opt.state[param][key] = torch.empty_like(param).copy_(value)
    return meta


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("tokens", pa.int64()),
            ("loss", pa.float64()),
            ("fvu", pa.float64()),
            ("auxk_loss", pa.float64()),
            ("dead_fraction", pa.float64()),
            ("l0", pa.float64()),
            ("lr", pa.float64()),
            ("tokens_per_s", pa.float64()),
            ("elapsed_s", pa.float64()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic.write_parquet(path, table)


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
    """The training curve, verified against its directory's manifest ([] before any)."""
    path = Path(out_dir) / HISTORY_NAME
    if not path.exists():
        return []
    return atomic.read_parquet(path).to_pylist()


def _is_extension(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Only a larger token budget (and so as many chunks or more): the run continues, and
    ends where one run with the larger budget would (RowOrder's first epoch is a prefix)."""
    differ = {k for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
    return (
        differ <= {"max_tokens", "n_chunks"}
        and now["max_tokens"] > saved["max_tokens"]
        and now["n_chunks"] >= saved["n_chunks"]
    )


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """'sae.k: 4 -> 8' for every leaf where two nested settings dicts differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: {saved!r} -> {now!r}"]


# ----- the loop -----------------------------------------------------------------------------
def train(
    source: ActivationSource,
    masks: torch.Tensor,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    batch_size: int,
    max_tokens: int,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    inputs: str | None = None,
) -> MLSAE:
    """Train an MLSAE on `source` and save it to `out_dir`; resume if a checkpoint is there.

    masks: [n_chunks, pos] bool, True at positions that count (not BOS/EOS/PAD).
    max_tokens: token budget (chunk positions, special ones included, as the reference).
    stop_after_steps: stop early (to test resume); the run continues on the next call.
    inputs: what transforms the activations `source` yields (a tuned lens's fingerprint),
    recorded with the settings so a resume through another transformation is refused.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, _ = dist_info()
    # one writer per output directory (rank 0 holds it for the whole process group)
    with output_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        return _train(
            source,
            masks,
            sae_cfg,
            train_cfg,
            out_dir,
            batch_size,
            max_tokens,
            metadata,
            progress,
            stop_after_steps,
            on_step,
            inputs,
        )


def _train(
    source: ActivationSource,
    masks: torch.Tensor,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    batch_size: int,
    max_tokens: int,
    metadata: dict[str, Any] | None,
    progress: bool,
    stop_after_steps: int | None,
    on_step: Callable[[dict[str, Any]], None] | None,
    inputs: str | None = None,
) -> MLSAE:
    from tqdm.auto import tqdm

    rank, world = dist_info()
    if rank == 0:
        atomic.remove_stale_temporaries(out_dir)  # litter from a run killed mid-write
    device = torch.device(resolve_device(train_cfg.device))
    precision = resolve_precision(train_cfg.precision, device)
    torch.manual_seed(train_cfg.seed)

    n_chunks, pos = masks.shape
    accum = train_cfg.accumulate_grad_batches
    tokens_per_step = batch_size * pos * accum * world
    total_steps = max(1, math.ceil(max_tokens / tokens_per_step))
    n_latents = sae_cfg.n_latents(source.d_model)
    run_config = {
        "sae": {**sae_cfg.__dict__},
        # what decides the weights; checkpoint_every and nproc_per_node (world_size is) do not
        "train": {
            **{
                k: v
                for k, v in train_cfg.__dict__.items()
                if k not in ("checkpoint_every", "nproc_per_node")
            },
            "precision": dtype_name(precision),  # resolved: "auto" may differ per machine
        },
        "batch_size": batch_size,
        "max_length": pos,
        "max_tokens": max_tokens,
        "world_size": world,
        "n_chunks": n_chunks,
    }
    if inputs is not None:  # absent for plain activations, as in states from before
        run_config["inputs"] = inputs
    sae = MLSAE.from_config(source.d_model, sae_cfg, metadata=metadata).to(device)
    opt = make_optimizer(sae, train_cfg.lr, train_cfg.eps)
    order = RowOrder(n_chunks, train_cfg.seed)

    state_dir = out_dir / STATE_DIR
    if rank == 0:
        atomic.recover_dir(state_dir)
    step, history = 0, []
    if (state_dir / "state.json").exists():
        saved = json.loads((state_dir / "state.json").read_text())["run_config"]
        saved["train"].setdefault("precision", "float32")  # states from before the setting
        now = json.loads(json.dumps(run_config))
        changed = _differences(saved, now)
        if changed and not _is_extension(saved, now):
            raise ValueError(
                f"{out_dir} holds a run with other settings ({'; '.join(changed)}); rerun with "
                "the same settings to resume (or only a larger --max_tokens to extend it), or "
                "use another --out directory"
            )
        if changed:
            logger.info(
                "extending %s from %d to %d tokens", out_dir, saved["max_tokens"], max_tokens
            )
        meta = _load_state(state_dir, sae, opt)
        step = int(meta["step"])
        # the history committed with this state (older checkpoints kept it beside the state)
        source_dir = state_dir if (state_dir / HISTORY_NAME).exists() else out_dir
        history = [r for r in read_history(source_dir) if r["step"] < step]
        logger.info("resuming %s at step %d/%d", out_dir, step, total_steps)
        if meta.get("done") and step >= total_steps:
            return MLSAE.from_pretrained(out_dir, device=device)
    sae.train()

    def checkpoint(done: bool = False) -> None:
        if rank != 0:
            return
        state = {"step": step, "run_config": run_config, "done": done}
        _save_state(state_dir, sae, opt, state, history)
        _write_history(out_dir / HISTORY_NAME, history)  # the user-facing copy

    bar = tqdm(
        total=total_steps * tokens_per_step,
        initial=step * tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not progress or rank != 0,
        desc=f"train {out_dir.name}",
    )
    t_start = time.perf_counter()
    steps_this_call = 0
    while step < total_steps:
        if stop_after_steps is not None and steps_this_call >= stop_after_steps:
            break
        t0 = time.perf_counter()
        fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
        n_tok = torch.zeros((), dtype=torch.long, device=device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fvu, aux, l0*tokens
        for a in range(accum):
            micro = (step * accum + a) * world + rank
            rows = order.rows(micro * batch_size, batch_size)
            with autocast(device, precision):
                acts = source(rows).to(device)  # [L, B, P, d]
            mask = masks[rows].to(device)  # [B, P]
            x = acts[:, mask].float()  # [L, N, d]
            if x.shape[1] == 0:
                continue
            if not bool(torch.isfinite(x).all()):  # the inputs, not the optimiser, are at fault
                bad = [int(i) for i in (~torch.isfinite(x)).flatten(1).any(1).nonzero()]
                raise TrainingDiverged(
                    f"step {step}: the model's activations are NaN/Inf (at {len(bad)} of "
                    f"{x.shape[0]} layers, layer index {bad[:8]}); check the model's weights or "
                    f"dtype (load it in float32) and the data. The last good checkpoint is kept "
                    f"in {state_dir}"
                )
            if step == 0 and a == 0 and steps_this_call == 0:
                sae.init_pre_encoder_bias(x)
                _broadcast_params(sae)
            with autocast(device, precision):
                out = sae(x)  # the encoder GEMM in `precision`; decode and losses float32
            loss, main, aux = total_loss(x, out, sae_cfg.auxk_coef)
            (loss / accum).backward()
            fired |= out.fired
            n_tok += x.shape[1]
            l0 = (out.topk.values > sae.dead_threshold).sum(-1).float().mean()
            sums += torch.stack([loss.detach(), main.detach(), aux.detach(), l0]).double()
        if world > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    _all_reduce(p.grad).div_(world)
            _all_reduce(fired.to(torch.uint8), "max")
            _all_reduce(n_tok)
            _all_reduce(sums)
        sums /= accum * world
        loss_value = float(sums[0])
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"step {step}: loss is {loss_value} with finite inputs; likely cause: a learning "
                f"rate too high (lr={train_cfg.lr}): rerun with a smaller --lr and another --out. "
                f"The last good checkpoint is kept in {state_dir}"
            )
        optimizer_step(sae, opt)
        sae.update_dead(fired, int(n_tok))
        if not all(torch.isfinite(p).all() for p in sae.parameters()):
            raise TrainingDiverged(
                f"step {step}: weights became NaN/Inf after the optimiser step; likely cause: a "
                f"learning rate too high (lr={train_cfg.lr}). The last good checkpoint is kept "
                f"in {state_dir}"
            )
        step += 1
        steps_this_call += 1
        dt = time.perf_counter() - t0
        row = {
            "step": step - 1,
            "tokens": step * tokens_per_step,
            "loss": loss_value,
            "fvu": float(sums[1]),
            "auxk_loss": float(sums[2]),
            "dead_fraction": float(sae.dead_mask().float().mean()),
            "l0": float(sums[3]),
            "lr": train_cfg.lr,
            "tokens_per_s": tokens_per_step / max(dt, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
        }
        history.append(row)
        bar.update(tokens_per_step)
        bar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.2f}")
        if on_step is not None:
            on_step(row)
        if step % train_cfg.checkpoint_every == 0 and step < total_steps:
            checkpoint()
    bar.close()
    if step >= total_steps:
        if rank == 0:
            sae.save_pretrained(out_dir)
        checkpoint(done=True)
        logger.info("trained %s: %d steps, final fvu %.4f", out_dir, step, history[-1]["fvu"])
    else:
        checkpoint()
    sae.eval()
    return sae
