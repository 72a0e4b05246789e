"""Training: `train`, the one entry (it holds the output directory's lock), runs a `Trainer`,
split like SAELens's: `resume`, `step` (accumulate, project, step, renormalise),
`check_finite`, `checkpoint`, driven by `fit`.

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
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from mlsae_core import atomic
from mlsae_core.checkpoint import CheckpointError, load_weights
from mlsae_core.config import ConfigError, SAEConfig, TrainConfig, resolve_device
from mlsae_core.layout import RunLayout
from mlsae_core.lock import output_lock
from mlsae_core.losses import total_loss
from mlsae_core.plan import Plan, decide, run_settings
from mlsae_core.precision import autocast, dtype_name, resolve_precision
from mlsae_core.sae import MLSAE

if TYPE_CHECKING:
    from mlsae_core.lens import TunedLens

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
HISTORY_NAME = "history.parquet"
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "state.json", HISTORY_NAME)


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
        n = self.n_rows
        return torch.stack([self._perm(i // n)[i % n] for i in range(start, start + count)])


def make_optimizer(sae: MLSAE, lr: float, eps: float) -> torch.optim.Adam:
    """Adam(lr, eps) over the SAE's parameters, fused where the installed torch supports it
    for the device (the same update: tests/test_sparse.py), else the plain implementation;
    not a sparse Adam, which would change the maths (docs/performance.md)."""
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
    """(rank, world_size); under torchrun, joins the process group once: with CUDA, each rank
    on the GPU of its LOCAL_RANK (`resolve_device`), nccl for CUDA tensors and gloo for CPU
    ones (a `device: cpu` run on a GPU machine); without CUDA, gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(resolve_device("cuda"))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


# ----- the training state -------------------------------------------------------------------
def _save_state(
    directory: Path,
    sae: MLSAE,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """weights + optimiser tensors + JSON scalars + the history up to this step, committed as
    one atomic directory whose manifest (written last) records all four: a resume never loses
    or duplicates training-curve rows, and never trusts a damaged file."""
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
        meta = {**state, "param_groups": opt_sd["param_groups"]}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        _write_history(tmp / HISTORY_NAME, history)
        atomic.record(tmp, STATE_FILES)


def read_state(directory: Path) -> dict[str, Any]:
    """state.json of a training state `atomic.verify` accepts (every file of it, first)."""
    try:
        atomic.verify(directory, STATE_FILES)
    except atomic.CorruptFileError as exc:
        raise CheckpointError(
            f"{exc.path} does not match {directory / atomic.MANIFEST_NAME} (missing, truncated "
            f"or modified after it was written); delete {directory} to restart the run from "
            "step 0, or restore it"
        ) from exc
    return json.loads((directory / "state.json").read_text())


def _load_tensors(
    directory: Path, sae: MLSAE, opt: torch.optim.Optimizer, param_groups: list[Any]
) -> None:
    """The weights, dead-latent counters and optimiser moments of a verified state."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    sae.tokens_since_fired.copy_(tensors.pop("tokens_since_fired"))
    load_weights(sae, tensors)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in load_file(str(directory / "optimizer.safetensors")).items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": opt_state, "param_groups": param_groups})
    # Moments are saved contiguous; give them back their parameter's memory layout (the
    # decoder weight is stored transposed), as a fused kernel walks param and state together.
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if value.shape == param.shape and value.stride() != param.stride():
                    opt.state[param][key] = torch.empty_like(param).copy_(value)


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    floats = ("loss", "fvu", "auxk_loss", "dead_fraction", "l0", "lr", "tokens_per_s", "elapsed_s")
    columns = [("step", pa.int64()), ("tokens", pa.int64()), *[(c, pa.float64()) for c in floats]]
    atomic.write_parquet(path, pa.Table.from_pylist(rows, schema=pa.schema(columns)))


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
    """The training curve, verified against its directory's manifest ([] before any)."""
    path = Path(out_dir) / HISTORY_NAME
    if not path.exists():
        return []
    return atomic.read_parquet(path).to_pylist()


# ----- the trainer --------------------------------------------------------------------------
class Trainer:
    """One run into `out_dir`: the MLSAE, its optimiser, the data order and the step count.
    Every rank of a process group builds one; rank 0 alone writes; `train` drives it."""

    def __init__(
        self,
        source: ActivationSource,
        masks: torch.Tensor,
        sae_cfg: SAEConfig,
        train_cfg: TrainConfig,
        out_dir: Path,
        batch_size: int,
        max_tokens: int,
        metadata: dict[str, Any] | None = None,
        inputs: str | None = None,
    ) -> None:
        self.rank, self.world = dist_info()
        self.device = torch.device(resolve_device(train_cfg.device))
        self.precision = resolve_precision(train_cfg.precision, self.device)
        torch.manual_seed(train_cfg.seed)  # before the SAE's initialisation
        self.source, self.masks, self.out_dir = source, masks, out_dir
        self.sae_cfg, self.cfg, self.batch_size = sae_cfg, train_cfg, batch_size
        n_chunks, pos = masks.shape
        self.tokens_per_step = batch_size * pos * train_cfg.accumulate_grad_batches * self.world
        self.total_steps = max(1, math.ceil(max_tokens / self.tokens_per_step))
        # What decides the weights, as recorded in state.json: a resume must match it.
        config = run_settings(vars(sae_cfg), vars(train_cfg), dtype_name(self.precision),
                              batch_size=batch_size, max_length=pos, max_tokens=max_tokens,
                              world_size=self.world, inputs=inputs, data=metadata,
                              n_chunks=n_chunks)  # fmt: skip
        self.run_config = json.loads(json.dumps(config))  # as it reads back from state.json
        self.sae = MLSAE.from_config(source.d_model, sae_cfg, metadata=metadata).to(self.device)
        self.opt = make_optimizer(self.sae, train_cfg.lr, train_cfg.eps)
        self.order = RowOrder(n_chunks, train_cfg.seed)
        self.state_dir = out_dir / STATE_DIR
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []
        self.t_start = time.perf_counter()

    def resume(self) -> bool:
        """Continue from the saved state, if any (plan.decide: refused unless its settings are
        these, or these with only a larger token budget). True when it is finished."""
        if not (self.state_dir / "state.json").exists():
            return False
        meta = read_state(self.state_dir)
        saved = meta["run_config"]
        plan = decide(saved, self.run_config, done=bool(meta.get("done")))
        if plan.action == "conflict":
            raise ValueError(plan.refusal(self.out_dir))
        if plan.action == "extend":
            logger.info("extending %s from %d to %d tokens", self.out_dir,
                        saved["max_tokens"], self.run_config["max_tokens"])  # fmt: skip
        _load_tensors(self.state_dir, self.sae, self.opt, meta["param_groups"])
        self.steps_done = int(meta["step"])
        # the history committed with this state: never a lost or a repeated row
        self.history = [r for r in read_history(self.state_dir) if r["step"] < self.steps_done]
        logger.info("resuming %s at step %d/%d", self.out_dir, self.steps_done, self.total_steps)
        return bool(meta.get("done")) and self.steps_done >= self.total_steps

    def _micro_batch(self, a: int, fired: torch.Tensor, n_tok: torch.Tensor,
                     sums: torch.Tensor) -> None:  # fmt: skip
        """Forward and backward of this rank's `a`-th micro-batch of the current step."""
        micro = (self.steps_done * self.cfg.accumulate_grad_batches + a) * self.world + self.rank
        rows = self.order.rows(micro * self.batch_size, self.batch_size)
        with autocast(self.device, self.precision):
            acts = self.source(rows).to(self.device)  # [L, B, P, d]
        x = acts[:, self.masks[rows].to(self.device)].float()  # [L, N, d]
        if x.shape[1] == 0:
            return
        self._check_inputs(x)
        if self.steps_done == 0 and a == 0:
            self.sae.init_pre_encoder_bias(x)
            if self.world > 1:  # every rank starts from rank 0's weights
                for p in self.sae.parameters():
                    dist.broadcast(p.data, src=0)
        with autocast(self.device, self.precision):
            out = self.sae(x)  # the encoder GEMM in `precision`; decode and losses float32
        loss, main, aux = total_loss(x, out, self.sae_cfg.auxk_coef)
        (loss / self.cfg.accumulate_grad_batches).backward()
        fired |= out.fired
        n_tok += x.shape[1]
        l0 = (out.topk.values > self.sae.dead_threshold).sum(-1).float().mean()
        sums += torch.stack([loss.detach(), main.detach(), aux.detach(), l0]).double()

    def step(self) -> dict[str, Any]:
        """One optimiser step over every rank's micro-batches; returns its history row."""
        t0 = time.perf_counter()
        fired = torch.zeros(self.sae.n_latents, dtype=torch.bool, device=self.device)
        n_tok = torch.zeros((), dtype=torch.long, device=self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss fvu aux l0
        for a in range(self.cfg.accumulate_grad_batches):
            self._micro_batch(a, fired, n_tok, sums)
        if self.world > 1:  # dist_info initialised the process group
            for p in self.sae.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
            any_rank = fired.to(torch.uint8)
            dist.all_reduce(any_rank, op=dist.ReduceOp.MAX)
            fired.copy_(any_rank)  # fired on any rank
            dist.all_reduce(n_tok)
            dist.all_reduce(sums)
        sums /= self.cfg.accumulate_grad_batches * self.world
        optimizer_step(self.sae, self.opt)
        self.sae.update_dead(fired, int(n_tok))
        self.check_finite(float(sums[0]))
        self.steps_done += 1
        row = {
            "step": self.steps_done - 1,
            "tokens": self.steps_done * self.tokens_per_step,
            "loss": float(sums[0]),
            "fvu": float(sums[1]),
            "auxk_loss": float(sums[2]),
            "dead_fraction": float(self.sae.dead_mask().float().mean()),
            "l0": float(sums[3]),
            "lr": self.cfg.lr,
            "tokens_per_s": self.tokens_per_step / max(time.perf_counter() - t0, 1e-9),
            "elapsed_s": time.perf_counter() - self.t_start,
        }
        self.history.append(row)
        return row

    def _check_inputs(self, x: torch.Tensor) -> None:
        """NaN/Inf activations: the model or the data is at fault, not the optimiser."""
        if bool(torch.isfinite(x).all()):
            return
        bad = [int(i) for i in (~torch.isfinite(x)).flatten(1).any(1).nonzero()]
        raise TrainingDiverged(
            f"step {self.steps_done}: the model's activations are NaN/Inf (at {len(bad)} of "
            f"{x.shape[0]} layers, layer index {bad[:8]}); check the model's weights or dtype "
            f"(load it in float32) and the data. The last good checkpoint is kept in "
            f"{self.state_dir}"
        )

    def check_finite(self, loss: float) -> None:
        """After a step on finite inputs: a NaN/Inf loss or weights point at the learning
        rate. Nothing of the step is saved; the last good checkpoint stays."""
        step, lr, kept = self.steps_done, self.cfg.lr, self.state_dir
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"step {step}: loss is {loss} with finite inputs; likely cause: a learning "
                f"rate too high (lr={lr}): rerun with a smaller --lr and another --out. The "
                f"last good checkpoint is kept in {kept}"
            )
        if not all(torch.isfinite(p).all() for p in self.sae.parameters()):
            raise TrainingDiverged(
                f"step {step}: weights became NaN/Inf after the optimiser step; likely cause: "
                f"a learning rate too high (lr={lr}). The last good checkpoint is kept in {kept}"
            )

    def checkpoint(self, done: bool = False) -> None:
        """The training state, then the user-facing copy of the history (rank 0 only)."""
        if self.rank != 0:
            return
        state = {"step": self.steps_done, "run_config": self.run_config, "done": done}
        _save_state(self.state_dir, self.sae, self.opt, state, self.history)
        _write_history(self.out_dir / HISTORY_NAME, self.history)

    def fit(
        self,
        progress: bool = True,
        stop_after_steps: int | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> MLSAE:
        """Step to the budget (or `stop_after_steps` more), checkpointing every
        `checkpoint_every` steps; a finished run saves the MLSAE into `out_dir`."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps * self.tokens_per_step,
            initial=self.steps_done * self.tokens_per_step,
            unit="tok",
            unit_scale=True,
            disable=not progress or self.rank != 0,
            desc=f"train {self.out_dir.name}",
        )
        self.sae.train()
        self.t_start = time.perf_counter()
        stop = self.total_steps
        if stop_after_steps is not None:
            stop = min(stop, self.steps_done + stop_after_steps)
        while self.steps_done < stop:
            row = self.step()
            bar.update(self.tokens_per_step)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.2f}")
            if on_step is not None:
                on_step(row)
            every = self.cfg.checkpoint_every
            if self.steps_done % every == 0 and self.steps_done < self.total_steps:
                self.checkpoint()
        bar.close()
        if self.steps_done >= self.total_steps:
            if self.rank == 0:
                self.sae.save_pretrained(self.out_dir)
            self.checkpoint(done=True)
            logger.info("trained %s: %d steps, final fvu %.4f", self.out_dir,
                        self.steps_done, self.history[-1]["fvu"])  # fmt: skip
        else:
            self.checkpoint()
        self.sae.eval()
        return self.sae


# ----- the one entry ------------------------------------------------------------------------
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
    lens: TunedLens | None = None,
) -> MLSAE:
    """Train an MLSAE on `source` and save it to `out_dir`; resume if a checkpoint is there.
    Rank 0 holds `out_dir`'s lock for the whole run, so one process writes a run directory.

    masks: [n_chunks, pos] bool, True at positions that count (not BOS/EOS/PAD).
    max_tokens: token budget (chunk positions, special ones included, as the reference).
    stop_after_steps: stop early (to test resume); the run continues on the next call.
    lens: the tuned lens `source` applies: its fingerprint is recorded with the settings (a
    resume through another lens is refused) and a copy is kept in the run directory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = dist_info()
    barrier = dist.barrier if world > 1 else lambda: None
    with output_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            atomic.remove_stale_temporaries(out_dir)  # litter from a run killed mid-write
            atomic.recover_dir(out_dir / STATE_DIR)
        barrier()  # the other ranks read the state rank 0 has recovered
        copy = RunLayout(out_dir).lens
        inputs = lens.fingerprint() if lens is not None else None
        if lens is not None and (copy / "config.json").is_file():
            from mlsae_core.lens import TunedLens

            held = TunedLens.load(copy).fingerprint()
            if held != inputs:  # refuse a directory trained through another lens
                raise ConfigError(Plan("conflict", {"inputs": (held, inputs)}).refusal(out_dir))
        trainer = Trainer(source, masks, sae_cfg, train_cfg, out_dir, batch_size, max_tokens,
                          metadata, inputs)  # fmt: skip
        if trainer.resume():
            sae = MLSAE.from_pretrained(out_dir, device=trainer.device)
        else:
            if lens is not None and rank == 0 and not (copy / "config.json").is_file():
                lens.save(copy)  # the run directory is self-contained
            sae = trainer.fit(progress, stop_after_steps, on_step)
        barrier()  # every rank returns once rank 0 has written the run
        return sae
