"""Every setting of a run, defined once (docs/architecture.md, "Settings, defined once"): frozen
dataclasses whose fields carry the default, help and range; the CLI's flags, the sweep YAML and
the pipeline are built from them. A bad value raises `ConfigError`, one line naming the field,
the value and what is allowed, before any compute starts.

Kept free of torch so the CLI and Dagster's code server start quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import ConfigDict, Field, StrictInt, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from mlsae_core.layout import DATA_DIR_ENV, data_root

Device = Literal["cpu", "cuda", "auto"]
# Precisions (precision.resolve_precision): auto = bfloat16 where native, else float32.
Precision = Literal["auto", "float32", "bfloat16"]
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEVICE_HELP = "cpu, cuda, or auto (cuda when available)"
NO_FLAG = {"cli": False}  # json_schema_extra of a field the CLI does not expose
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message says which and what is allowed."""


# ----- pydantic's errors as one line -------------------------------------------------------
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}  # fmt: skip
_KINDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
          "string_too_short": "a non-empty text", "string_pattern_mismatch": "a non-empty text"}  # fmt: skip


def _fields_at(cls: Any, path: list[str]) -> tuple[dict[str, Any], Any]:
    """(fields of the class reached from `cls` along `path`, the last field's FieldInfo)."""
    info = None
    for part in path:
        info = getattr(cls, "__pydantic_fields__", {}).get(part)
        cls = info.annotation if info else None
    return getattr(cls, "__pydantic_fields__", {}), info


def _allowed(err: Mapping[str, Any], info: Any) -> str:
    """What a field allows, in words: both bounds of a range, the choices of a Literal."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        limit = ctx[_BOUNDS[kind][0]]
        bounds = [(op, getattr(m, key)) for m in getattr(info, "metadata", [])
                  for key, op in _BOUNDS.values() if getattr(m, key, None) is not None]  # fmt: skip
        ranges = " and ".join(f"{op} {v:g}" for op, v in bounds or [(_BOUNDS[kind][1], limit)])
        return f"{'an integer' if isinstance(limit, int) else 'a number'} {ranges}"
    if kind == "literal_error":
        return "one of " + ctx["expected"].replace("'", "").replace(" or ", ", ")
    return _KINDS.get(kind) or err["msg"][:1].lower() + err["msg"][1:]


def config_error(exc: ValidationError, cls: Any, where: str = "") -> ConfigError:
    """pydantic's errors as one line: `name=value is not allowed: what is`, unknown keys by
    name with the keys their section allows (`where` names the file or mapping)."""
    lines: list[str] = []
    unknown: dict[tuple[str, ...], list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if isinstance(p, str)]  # list indexes dropped
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(tuple(loc[:-1]), []).append(loc[-1])
        elif err["type"] == "value_error":  # raised by a validator, naming the field itself
            lines.append(str(err["ctx"]["error"]))
        elif err["type"] == "missing":
            lines.append(f"{'.'.join(loc)} is missing")
        else:
            allowed = _allowed(err, _fields_at(cls, loc)[1])
            lines.append(f"{'.'.join(loc)}={err['input']!r} is not allowed: {allowed}")
    lines = [f"{where}: {line}" if where else line for line in lines]
    for section, keys in unknown.items():
        place = " of ".join(p for p in (".".join(section), where or cls.__name__) if p)
        allowed = sorted(_fields_at(cls, list(section))[0])
        lines.append(f"unknown key(s) {sorted(keys)} in {place}; allowed keys are {allowed}")
    return ConfigError("; ".join(lines))


def settings(cls: type[T]) -> type[T]:
    """A frozen pydantic dataclass that refuses unknown keys and raises ConfigError."""
    cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise config_error(exc, cls) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


# ----- the settings ------------------------------------------------------------------------
@settings
class SAEConfig:
    """The MLSAE's shape and sparsity (docs/method.md §3)."""

    expansion_factor: StrictInt = Field(
        64, ge=1, description="latents per input dimension: n_latents = this * d"
    )
    k: StrictInt = Field(
        32, ge=1, description="active latents per vector (TopK)", json_schema_extra={"flag": "-k"}
    )
    auxk: StrictInt | None = Field(
        256, ge=1, description="dead latents in the AuxK loss (0 or none: no AuxK loss)"
    )
    auxk_coef: float = Field(1 / 32, ge=0, description="scale of the AuxK loss")
    dead_tokens_threshold: StrictInt = Field(
        10_000_000, ge=1, description="tokens without firing after which a latent counts as dead"
    )
    dead_threshold: float = Field(
        1e-3, ge=0, description="activation above which a latent counts as firing"
    )
    standardize: bool = Field(True, description="standardize each input vector (mean 0, std 1)")

    @field_validator("auxk", mode="before")
    @classmethod
    def _auxk_off(cls, value: Any) -> Any:
        return None if value == 0 and not isinstance(value, bool) else value  # `--auxk 0`

    def n_latents(self, d_model: int) -> int:
        n = self.expansion_factor * d_model
        if self.k > n:
            allowed = f"at most n_latents = expansion_factor*d = {n}"
            raise ConfigError(f"k={self.k!r} is not allowed: {allowed}")
        return n


@settings
class DataConfig:
    """Where text comes from and how it is cut into token chunks (docs/method.md §2)."""

    dataset: str = Field(
        "brown",
        min_length=1,
        description="hub dataset id (e.g. monology/pile-uncopyrighted), local .txt/.jsonl/"
        ".jsonl.zst/.parquet file or directory, 'brown' (the offline Brown corpus) or a "
        "source's name under the storage root's sources/",
    )
    max_length: StrictInt = Field(2048, ge=2, description="tokens per sequence")
    batch_size: StrictInt = Field(1, ge=1, description="sequences per training micro-batch")
    max_tokens: StrictInt = Field(1_000_000_000, ge=1, description="training token budget")
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of documents held out for evaluation"
    )
    text_field: str = Field(
        "text", description="field holding the text in .jsonl/.parquet/hub rows"
    )
    split: str = Field("train", description="hub dataset split to stream")


@settings
class TrainConfig:
    """Optimisation settings (docs/method.md §3.9); defaults are the reference's."""

    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    eps: float = Field(6.25e-10, gt=0, description="Adam epsilon")
    accumulate_grad_batches: StrictInt = Field(
        64, ge=1, description="micro-batches per optimiser step"
    )
    seed: StrictInt = Field(
        0, description="seed for the initialisation, the data order and the split"
    )
    checkpoint_every: StrictInt = Field(
        100, ge=1, description="optimiser steps between resume checkpoints"
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    precision: Precision = Field(
        "auto",
        description="mixed precision: bfloat16 runs the transformer forward and the encoder GEMM "
        "that picks the TopK (weights, losses, Adam and dead-latent counters stay float32); "
        "float32 everywhere is exact; auto is bfloat16 where the hardware has it natively "
        "(quality measured: docs/performance.md)",
    )
    nproc_per_node: StrictInt = Field(
        1,
        ge=1,
        description="processes for data-parallel training in the pipeline (torchrun); on the "
        "command line prefix the command with torchrun instead",
        json_schema_extra=NO_FLAG,
    )


@settings
class EvalConfig:
    """One evaluation pass over held-out text: metrics, distributions, variance, examples."""

    max_tokens: StrictInt = Field(100_000, ge=1, description="held-out tokens to evaluate")
    splice_max_tokens: StrictInt | None = Field(
        None,
        ge=0,
        description="splice metrics (dCE, KL: one partial forward per layer, the costly part) "
        "over only the first N of those tokens (default: all; 0: none)",
    )
    batch_size: StrictInt = Field(4, ge=1, description="sequences per evaluation batch")
    n_examples: StrictInt = Field(
        32, ge=1, description="max-activating examples per (latent, layer)"
    )
    n_context: StrictInt = Field(4, ge=0, description="context tokens each side of an example")
    delta_dtype: Precision = Field(
        "auto",
        description="precision of the spliced-minus-clean logit GEMM behind dCE/KL: float32 is "
        "exact; bfloat16 (auto's choice where native) is several times faster, moving KL by "
        "<= 2.7e-4 relative, dCE by <= 3.9e-3 relative or 5.1e-5 nats (docs/performance.md)",
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    prompt: str = Field(DEFAULT_PROMPT, pattern=r"\S", description="prompt of the prompt heatmap")
    resid_tokens: StrictInt = Field(
        20_000,
        ge=1,
        description="tokens for the residual-stream cosine similarity",
        json_schema_extra={"flag": "--max_tokens"},
    )

    @property
    def spliced_tokens(self) -> int:
        """Tokens that get splice metrics (splice_max_tokens, capped by max_tokens)."""
        if self.splice_max_tokens is None:
            return self.max_tokens
        return min(self.splice_max_tokens, self.max_tokens)


@settings
class LensConfig:
    """Training a tuned lens (Belrose et al. 2023; mlsae_core/lens.py), sized for a CPU (why
    not the paper's schedule: docs/tuned_lens.md)."""

    max_tokens: StrictInt = Field(
        8192,
        ge=1,
        description="counted training tokens whose block outputs are cached (memory: tokens * "
        "layers * d * 4 bytes) and sampled from every step",
    )
    steps: StrictInt = Field(
        32,
        ge=1,
        description="optimiser steps (AdamW, learning rate decayed linearly to 0); the defaults "
        "make one pass over the cached tokens (steps * batch_size = max_tokens)",
    )
    batch_size: StrictInt = Field(
        256,
        ge=1,
        description="counted token positions per step, every trained layer seeing the same ones",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate at step 0")
    weight_decay: float = Field(
        1e-3, ge=0, description="AdamW decoupled weight decay of the translators"
    )
    head_dtype: Precision = Field(
        "auto",
        description="precision of the training head GEMM (the cost): bfloat16 is ~3x faster "
        "where bf16 is native (auto picks it there, else float32); the target distribution and "
        "every reported KL stay float32",
    )
    eval_tokens: StrictInt = Field(
        1024,
        ge=1,
        description="held-out counted tokens for the per-layer KL table (logit vs tuned lens; "
        "float32 head, 2 full-vocabulary passes per token and layer)",
    )
    seed: StrictInt = Field(
        0, description="seed of the document split and of the training-position order"
    )
    device: Device = Field("auto", description=DEVICE_HELP)


@settings
class ProbeConfig:
    """k-sparse probing on the sae-probes datasets (docs/method.md §9)."""

    datasets: tuple[str, ...] = Field(
        ("default",),
        min_length=1,
        description="sae-probes dataset tags, 'default' (8 short-prompt sets) or 'all' (the 113 "
        "binary ones) (default: default)",
    )
    max_prompts: StrictInt | None = Field(
        None, ge=2, description="prompts per dataset, class-balanced (default: all)"
    )
    max_k: StrictInt = Field(16, ge=1, description="largest k of 1, 2, 4, ... probed")


@settings
class RunSpec:
    """One MLSAE to train: which model, which layers, which SAE, data and optimiser settings."""

    model_name: str = Field(
        "smollm2",
        description="hub id (e.g. EleutherAI/pythia-70m-deduped), local model directory, .gguf "
        "file, 'smollm2' (the offline default) or a model's name under the storage root's models/",
    )
    layers: tuple[int, ...] | None = Field(None, description="layers to train on (default: all)")
    tuned_lens: str | None = Field(
        None,
        description="directory of a tuned lens (mlsae lens train, or the tuned-lens package's "
        "layout): the MLSAE sees lens-transformed activations, reconstructions are mapped back "
        "through the inverse translator before splicing (default: none, plain activations)",
    )
    sae: SAEConfig = Field(default_factory=SAEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    split_seed: StrictInt | None = Field(
        None,
        description="seed of the document split when it differs from train.seed: a sweep's "
        "seeds of one config share its held-out text (default: train.seed)",
        json_schema_extra=NO_FLAG,
    )

    @property
    def document_seed(self) -> int:
        """The seed that splits the documents into train and test."""
        return self.train.seed if self.split_seed is None else self.split_seed

    @field_validator("layers", mode="after")
    @classmethod
    def _all_layers(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return value or None  # no layers listed: every layer


def resolve_device(device: str) -> str:
    """'auto' -> CUDA when available, else 'cpu'; an explicit 'cuda' without one is an error.
    CUDA is this process's GPU, `cuda:<LOCAL_RANK>`: under torchrun each rank gets its own."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: no CUDA device is visible; use 'cpu'")
    rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={rank} needs a GPU of its own but {count} are visible; run torchrun "
            f"with --nproc_per_node {count} or fewer per machine"
        )
    return f"cuda:{rank}"


# ----- mappings (sweep YAML, config.json) ---------------------------------------------------
def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build a settings class from a mapping (nested sections too), refusing unknown keys."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, not {type(values).__name__}")
    try:
        return cls.__pydantic_validator__.validate_python(dict(values))  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise config_error(exc, cls, where) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """A JSON-ready form of a RunSpec (layers as a list)."""
    out = to_dict(spec)
    out["layers"] = list(spec.layers) if spec.layers is not None else None
    return out


def spec_from_dict(d: Mapping[str, Any]) -> RunSpec:
    return from_dict(RunSpec, d, "spec")


# ----- the CLI, generated from the fields ---------------------------------------------------
# Hand-written, not a library's (both tried on these classes, Dec 2026): simple_parsing 0.1.9
# takes a pydantic Field object as the default itself and ignores its description; pydantic-
# settings 2.16 names nested fields `--sae.k`, hard-codes `--no-<name>`, hands StrictInt fields
# the raw string ('3' is refused), reads environment variables named like fields (K=7 sets k)
# and appends its own "(default: ...)" to every help.
def _field_type(annotation: Any) -> tuple[Any, bool, bool, tuple[str, ...] | None]:
    """(scalar type, optional, sequence, choices) of a field's annotation."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Annotated:  # StrictInt
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return str, optional, False, typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], optional, True, None
    return annotation, optional, False, None


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "all") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def cli_fields(cls: type) -> dict[str, Any]:
    """The scalar fields (name -> pydantic FieldInfo) of `cls` that the CLI exposes."""
    return {
        name: f
        for name, f in cls.__pydantic_fields__.items()  # type: ignore[attr-defined]
        if (f.json_schema_extra or {}).get("cli", True)
        and not dataclasses.is_dataclass(f.annotation)
    }


_DEFAULT_CLAUSE = re.compile(r" \(default: [^)]*\)")


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    from_checkpoint: Iterable[str] = (),
) -> None:
    """Add one flag per field of `cls` (`--<name>`, or the field's own flag such as `-k`).

    Defaults and help come from the field, each default stated once. Fields in
    `from_checkpoint` default to None, meaning "the value recorded in the checkpoint".
    """
    recorded = set(from_checkpoint)
    for name, f in cli_fields(cls).items():
        if only is not None and name not in only:
            continue
        kind, optional, sequence, choices = _field_type(f.annotation)
        flag = (f.json_schema_extra or {}).get("flag") or f"--{name}"
        help_text = f.description
        if kind is bool:  # every bool setting defaults to true: its flag turns it off
            help_text = f"do not {help_text}"
            parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "choices": choices}
        kwargs["type"] = _optional(kind) if optional else kind
        if sequence:
            kwargs["nargs"] = "+"
        if name in recorded:  # the field's own default clause gives way to the checkpoint's
            kwargs["default"] = None
            kwargs["help"] = f"{_DEFAULT_CLAUSE.sub('', help_text)} (default: the checkpoint's)"
        else:
            kwargs["default"] = f.default
            if "(default:" not in help_text:  # a None default says what it means in words
                kwargs["help"] = f"{help_text} (default: {f.default!r})"
        parser.add_argument(flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from the parsed flags of its fields (fields without a flag keep defaults)."""
    values = {name: getattr(args, name, None) for name in cli_fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
    return cls(**{**values, **overrides})


DATA_DIR_HELP = "storage root (default: $MLSAE_DATA_DIR, else data/)"


def add_data_dir(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--data_dir`: the one flag naming the storage root, in every command that uses one."""
    parser.add_argument("--data_dir", type=Path, default=None, help=DATA_DIR_HELP)


def use_data_dir(args: argparse.Namespace) -> Path:
    """The storage root of a command: `--data_dir` if given, made the process's
    $MLSAE_DATA_DIR so every reader of the root (models, sources, results) agrees."""
    if args.data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(Path(args.data_dir).expanduser().resolve())
    return data_root()
