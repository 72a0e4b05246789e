"""Every setting of a run, defined once: SAE, data, training and evaluation dataclasses.

Each field carries its default and its help text; the CLI's flags are generated from these
fields (`add_arguments`), the sweep YAML uses the same field names in sections of the same
names, and the pipeline builds the same dataclasses, so a default cannot drift between them.
Every check names the field, the bad value and what is allowed, before any compute starts.

Kept free of torch so the CLI and Dagster's code server start quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

VALID_DEVICES = ("cpu", "cuda", "auto")
# Precisions (precision.resolve_precision): auto = bfloat16 where native, else float32.
PRECISION_CHOICES = ("auto", "float32", "bfloat16")
DELTA_DTYPE_CHOICES = PRECISION_CHOICES  # the splice metrics' logit-difference GEMM
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message says which and what is allowed."""


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    cli: bool = True,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with the metadata the CLI generator reads (help, flag, choices)."""
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SAEConfig:
    """The MLSAE's shape and sparsity (docs/method.md §3)."""

    expansion_factor: int = setting(64, "latents per input dimension: n_latents = this * d")
    k: int = setting(32, "active latents per vector (TopK)", flag="-k")
    auxk: int | None = setting(256, "dead latents in the AuxK loss (0 or none: no AuxK loss)")
    auxk_coef: float = setting(1 / 32, "scale of the AuxK loss")
    dead_tokens_threshold: int = setting(
        10_000_000, "tokens without firing after which a latent counts as dead"
    )
    dead_threshold: float = setting(1e-3, "activation above which a latent counts as firing")
    standardize: bool = setting(True, "standardize each input vector (mean 0, std 1)")

    def __post_init__(self) -> None:
        if self.auxk == 0:
            object.__setattr__(self, "auxk", None)  # the CLI's way to turn AuxK off
        _check(
            _is_int(self.expansion_factor) and self.expansion_factor >= 1,
            "expansion_factor",
            self.expansion_factor,
            "an integer >= 1",
        )
        _check(_is_int(self.k) and self.k >= 1, "k", self.k, "an integer >= 1")
        _check(
            self.auxk is None or (_is_int(self.auxk) and self.auxk >= 1),
            "auxk",
            self.auxk,
            "0/None or an integer >= 1",
        )
        _check(self.auxk_coef >= 0, "auxk_coef", self.auxk_coef, "a number >= 0")
        _check(
            _is_int(self.dead_tokens_threshold) and self.dead_tokens_threshold >= 1,
            "dead_tokens_threshold",
            self.dead_tokens_threshold,
            "an integer >= 1",
        )
        _check(self.dead_threshold >= 0, "dead_threshold", self.dead_threshold, "a number >= 0")

    def n_latents(self, d_model: int) -> int:
        n = self.expansion_factor * d_model
        _check(self.k <= n, "k", self.k, f"at most n_latents = expansion_factor*d = {n}")
        return n


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into token chunks (docs/method.md §2)."""

    dataset: str = setting(
        "brown",
        "hub dataset id (e.g. monology/pile-uncopyrighted), local .txt/.jsonl/.jsonl.zst/"
        ".parquet file or directory, 'brown' (the offline Brown corpus) or a source's name "
        "under the storage root's sources/",
    )
    max_length: int = setting(2048, "tokens per sequence")
    batch_size: int = setting(1, "sequences per training micro-batch")
    max_tokens: int = setting(1_000_000_000, "training token budget")
    test_fraction: float = setting(0.1, "fraction of documents held out for evaluation")
    text_field: str = setting("text", "field holding the text in .jsonl/.parquet/hub rows")
    split: str = setting("train", "hub dataset split to stream")

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "dataset", self.dataset, "a hub id, a path, or 'brown'")
        _check(
            _is_int(self.max_length) and self.max_length >= 2,
            "max_length",
            self.max_length,
            "an integer >= 2",
        )
        _check(
            _is_int(self.batch_size) and self.batch_size >= 1,
            "batch_size",
            self.batch_size,
            "an integer >= 1",
        )
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1 (tokens)",
        )
        _check(
            0.0 <= self.test_fraction < 1.0,
            "test_fraction",
            self.test_fraction,
            "a fraction in [0, 1)",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (docs/method.md §3.9); defaults are the reference's."""

    lr: float = setting(1e-4, "Adam learning rate")
    eps: float = setting(6.25e-10, "Adam epsilon")
    accumulate_grad_batches: int = setting(64, "micro-batches per optimiser step")
    seed: int = setting(0, "seed for the initialisation, the data order and the split")
    checkpoint_every: int = setting(100, "optimiser steps between resume checkpoints")
    device: str = setting("auto", "cpu, cuda, or auto (cuda when available)", choices=VALID_DEVICES)
    precision: str = setting(
        "auto",
        "mixed precision: bfloat16 runs the transformer forward and the encoder GEMM that "
        "picks the TopK (weights, losses, Adam and dead-latent counters stay float32); "
        "float32 everywhere is exact; auto is bfloat16 where the hardware has it natively "
        "(quality measured: docs/performance.md)",
        choices=PRECISION_CHOICES,
    )
    nproc_per_node: int = setting(
        1,
        "processes for data-parallel training in the pipeline (torchrun); on the command line "
        "prefix the command with torchrun instead",
        cli=False,
    )

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.eps > 0, "eps", self.eps, "a number > 0")
        _check(
            _is_int(self.accumulate_grad_batches) and self.accumulate_grad_batches >= 1,
            "accumulate_grad_batches",
            self.accumulate_grad_batches,
            "an integer >= 1",
        )
        _check(_is_int(self.seed), "seed", self.seed, "an integer")
        _check(
            _is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
            "checkpoint_every",
            self.checkpoint_every,
            "an integer >= 1",
        )
        _check(self.device in VALID_DEVICES, "device", self.device, f"one of {VALID_DEVICES}")
        _check(
            self.precision in PRECISION_CHOICES,
            "precision",
            self.precision,
            f"one of {', '.join(PRECISION_CHOICES)}",
        )
        _check(
            _is_int(self.nproc_per_node) and self.nproc_per_node >= 1,
            "nproc_per_node",
            self.nproc_per_node,
            "an integer >= 1",
        )


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation pass over held-out text: metrics, distributions, variance, examples."""

    max_tokens: int = setting(100_000, "held-out tokens to evaluate")
    splice_max_tokens: int | None = setting(
        None,
        "splice metrics (dCE, KL: one partial forward per layer, the costly part) over only "
        "the first N of those tokens (default: all; 0: none)",
    )
    batch_size: int = setting(4, "sequences per evaluation batch")
    n_examples: int = setting(32, "max-activating examples per (latent, layer)")
    n_context: int = setting(4, "context tokens each side of an example")
    delta_dtype: str = setting(
        "auto",
        "precision of the spliced-minus-clean logit GEMM behind dCE/KL: float32 is exact; "
        "bfloat16 (auto's choice where native) is several times faster and moves KL/dCE by "
        "at most ~1e-3 relative (measured: docs/performance.md)",
        choices=DELTA_DTYPE_CHOICES,
    )
    device: str = setting("auto", "cpu, cuda, or auto (cuda when available)", choices=VALID_DEVICES)
    prompt: str = setting(DEFAULT_PROMPT, "prompt of the prompt heatmap")
    resid_tokens: int = setting(
        20_000, "tokens for the residual-stream cosine similarity", flag="--max_tokens"
    )

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "n_examples", "resid_tokens"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _check(
            self.splice_max_tokens is None
            or (_is_int(self.splice_max_tokens) and self.splice_max_tokens >= 0),
            "splice_max_tokens",
            self.splice_max_tokens,
            "none (all tokens) or an integer >= 0",
        )
        _check(
            _is_int(self.n_context) and self.n_context >= 0,
            "n_context",
            self.n_context,
            "an integer >= 0",
        )
        _check(
            self.delta_dtype in DELTA_DTYPE_CHOICES,
            "delta_dtype",
            self.delta_dtype,
            f"one of {', '.join(DELTA_DTYPE_CHOICES)}",
        )
        _check(self.device in VALID_DEVICES, "device", self.device, f"one of {VALID_DEVICES}")
        _check(
            isinstance(self.prompt, str) and bool(self.prompt.strip()),
            "prompt",
            self.prompt,
            "a non-empty text",
        )

    @property
    def spliced_tokens(self) -> int:
        """Tokens that get splice metrics (splice_max_tokens, capped by max_tokens)."""
        if self.splice_max_tokens is None:
            return self.max_tokens
        return min(self.splice_max_tokens, self.max_tokens)


@dataclass(frozen=True)
class LensConfig:
    """Training a tuned lens (Belrose et al. 2023; mlsae_core/lens.py), sized for a CPU.

    The paper's SGD (Nesterov 0.9, lr 1.0, 250 steps of 2^18 tokens) is ~10^4 x what two CPU
    cores do in minutes: every trained (token, layer) costs a full-vocabulary head forward
    and backward (~6 d V FLOPs). Adam reaches most of the KL reduction in ~10^2 steps of a
    few hundred tokens, on block outputs computed once and cached in memory.
    """

    max_tokens: int = setting(
        8192,
        "counted training tokens whose block outputs are cached (memory: tokens * layers * d "
        "* 4 bytes) and sampled from every step",
    )
    steps: int = setting(
        32,
        "optimiser steps (AdamW, learning rate decayed linearly to 0); the defaults make one "
        "pass over the cached tokens (steps * batch_size = max_tokens)",
    )
    batch_size: int = setting(
        256, "counted token positions per step, every trained layer seeing the same ones"
    )
    lr: float = setting(1e-3, "Adam learning rate at step 0")
    weight_decay: float = setting(1e-3, "AdamW decoupled weight decay of the translators")
    head_dtype: str = setting(
        "auto",
        "precision of the training head GEMM (the cost): bfloat16 is ~3x faster where bf16 is "
        "native (auto picks it there, else float32); the target distribution and every "
        "reported KL stay float32",
        choices=PRECISION_CHOICES,
    )
    eval_tokens: int = setting(
        1024,
        "held-out counted tokens for the per-layer KL table (logit vs tuned lens; float32 "
        "head, 2 full-vocabulary passes per token and layer)",
    )
    seed: int = setting(0, "seed of the document split and of the training-position order")
    device: str = setting("auto", "cpu, cuda, or auto (cuda when available)", choices=VALID_DEVICES)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "steps", "batch_size", "eval_tokens"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(
            self.head_dtype in PRECISION_CHOICES,
            "head_dtype",
            self.head_dtype,
            f"one of {', '.join(PRECISION_CHOICES)}",
        )
        _check(_is_int(self.seed), "seed", self.seed, "an integer")
        _check(self.device in VALID_DEVICES, "device", self.device, f"one of {VALID_DEVICES}")


@dataclass(frozen=True)
class RunSpec:
    """One MLSAE to train: which model, which layers, which SAE, data and optimiser settings."""

    model_name: str = setting(
        "smollm2",
        "hub id (e.g. EleutherAI/pythia-70m-deduped), local model directory, .gguf file, "
        "'smollm2' (the offline default) or a model's name under the storage root's models/",
    )
    layers: tuple[int, ...] | None = setting(None, "layers to train on (default: all)")
    tuned_lens: str | None = setting(
        None,
        "directory of a tuned lens (mlsae lens train, or the tuned-lens package's layout): "
        "the MLSAE sees lens-transformed activations, reconstructions are mapped back "
        "through the inverse translator before splicing (default: none, plain activations)",
    )
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers) or None)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' without one is an error."""
    import torch

    _check(device in VALID_DEVICES, "device", device, f"one of {VALID_DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: no CUDA device is visible; use 'cpu'")
    return device


# ----- mappings (sweep YAML, config.json) ---------------------------------------------------
def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build a config dataclass from a mapping, refusing unknown keys by name."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, not {type(values).__name__}")
    names = set(field_names(cls))
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """A JSON-ready form of a RunSpec (layers as a list)."""
    out = to_dict(spec)
    out["layers"] = list(spec.layers) if spec.layers is not None else None
    return out


def spec_from_dict(d: Mapping[str, Any]) -> RunSpec:
    return RunSpec(
        model_name=d["model_name"],
        layers=tuple(d["layers"]) if d.get("layers") is not None else None,
        tuned_lens=d.get("tuned_lens"),
        sae=from_dict(SAEConfig, d["sae"], "sae"),
        data=from_dict(DataConfig, d["data"], "data"),
        train=from_dict(TrainConfig, d["train"], "train"),
    )


# ----- the CLI, generated from the fields ---------------------------------------------------
def _field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, optional, sequence) of a field's annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "all") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The scalar fields of `cls` that the CLI exposes."""
    return [
        f
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", False) and not dataclasses.is_dataclass(f.type)
    ]


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    from_checkpoint: Iterable[str] = (),
) -> None:
    """Add one flag per field of `cls` (`--<name>`, or the field's own flag such as `-k`).

    Defaults and help come from the field. Fields in `from_checkpoint` default to None,
    meaning "the value recorded in the checkpoint".
    """
    keep = set(only) if only is not None else None
    skip, recorded = set(exclude), set(from_checkpoint)
    for f in cli_fields(cls):
        if (keep is not None and f.name not in keep) or f.name in skip:
            continue
        kind, optional, sequence = _field_type(cls, f)
        flag = f.metadata.get("flag") or f"--{f.name}"
        help_text = f.metadata["help"]
        if kind is bool:
            if f.default:
                parser.add_argument(
                    f"--no_{f.name}", dest=f.name, action="store_false", help=f"do not {help_text}"
                )
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            parser.set_defaults(**{f.name: f.default})
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        kwargs["type"] = _optional(kind) if optional else kind
        if sequence:
            kwargs["nargs"] = "+"
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.name in recorded:
            kwargs["default"] = None
            kwargs["help"] = f"{help_text} (default: the checkpoint's)"
        else:
            kwargs["default"] = f.default
            if "default" not in help_text:
                kwargs["help"] = f"{help_text} (default: {f.default!r})"
        parser.add_argument(flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from the parsed flags of its fields (fields without a flag keep defaults)."""
    values = {}
    for f in cli_fields(cls):
        if hasattr(args, f.name) and getattr(args, f.name) is not None:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)


__all__ = [
    "DEFAULT_PROMPT",
    "DELTA_DTYPE_CHOICES",
    "PRECISION_CHOICES",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LensConfig",
    "RunSpec",
    "SAEConfig",
    "TrainConfig",
    "add_arguments",
    "from_args",
    "from_dict",
    "resolve_device",
    "spec_from_dict",
    "spec_to_dict",
    "to_dict",
]
