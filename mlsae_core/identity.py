"""What identifies a run everywhere: its model key, SAE key and the run-id columns.

Every table carries the same six run-id columns (model, expansion_factor, k, layers,
tuned_lens, seed) with the same types, so Parquet files from many runs concatenate into one DuckDB view; the
pipeline's partition keys (`smollm2|x2-k16-Lall`) are built from the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from mlsae_core.config import ConfigError

RUN_ID_FIELDS: tuple[pa.Field, ...] = (
    pa.field("model", pa.string(), nullable=False),
    pa.field("expansion_factor", pa.int32(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("layers", pa.string(), nullable=False),
    # trained on tuned-lens-transformed activations (docs/method.md §2, "Tuned-lens inputs")
    pa.field("tuned_lens", pa.bool_(), nullable=False),
    # the training seed (initialisation and data order); a config's seeds share the test split
    pa.field("seed", pa.int32(), nullable=False),
)
RUN_ID_COLUMNS = tuple(f.name for f in RUN_ID_FIELDS)
MODEL_COLUMNS = ("model",)


def model_slug(name: str) -> str:
    """A file-name-safe short name: 'EleutherAI/pythia-70m-deduped' -> 'pythia-70m-deduped'."""
    base = str(name).rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "model"


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """None -> all layers; otherwise validated, sorted, de-duplicated."""
    if layers is None or len(layers) == 0:
        return list(range(n_layers))
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(
            f"layers={bad} is not allowed: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return out


def layers_label(layers: Sequence[int]) -> str:
    """'0-29' for a contiguous range, '3' for one layer, '0,5,10' otherwise."""
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError("layers must not be empty")
    if len(layers) == 1:
        return str(layers[0])
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def is_single_layer(label: str) -> bool:
    """A layers label naming one layer: a single-layer SAE, the paper's baseline."""
    return label.isdigit()


LENS_SUFFIX = "-lens"


def seed_suffix(seed: int) -> str:
    """'' for seed 0 (keys of one-seed sweeps stay as they were), else '-s<seed>'."""
    return f"-s{seed}" if seed else ""


def sae_key(
    expansion_factor: int,
    k: int,
    layers: Sequence[int] | None,
    tuned_lens: bool = False,
    seed: int = 0,
) -> str:
    """The pipeline's SAE partition key: 'x2-k16-Lall', 'x2-k16-L9', 'x2-k16-L0_5',
    'x2-k16-Lall-lens' for one trained on tuned-lens inputs, 'x2-k16-L9-s1' for seed 1."""
    label = "all" if layers is None else "_".join(map(str, layers))
    return (
        f"x{expansion_factor}-k{k}-L{label}{LENS_SUFFIX if tuned_lens else ''}{seed_suffix(seed)}"
    )


def run_id(
    model: str,
    expansion_factor: int,
    k: int,
    layers: Sequence[int],
    tuned_lens: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The run-id columns of one run, typed as every table stores them."""
    return {
        "model": model,
        "expansion_factor": int(expansion_factor),
        "k": int(k),
        "layers": layers_label(layers),
        "tuned_lens": bool(tuned_lens),
        "seed": int(seed),
    }


def run_id_of(sae: Any) -> dict[str, Any]:
    """The run-id columns of a checkpoint (an `MLSAE`), from its config.json metadata."""
    metadata = sae.metadata
    layers = metadata.get("layers") or list(range(int(metadata.get("n_model_layers", 1))))
    return run_id(
        model_slug(str(metadata.get("model_name", "unknown"))),
        int(metadata.get("expansion_factor", sae.n_latents // sae.n_inputs)),
        int(sae.k),
        layers,
        bool(metadata.get("tuned_lens", False)),
        # checkpoints from before the seed column trained and split with one seed
        int(metadata.get("seed", metadata.get("split_seed", 0))),
    )


def run_slug(run_id: Mapping[str, Any]) -> str:
    """'smollm2-x2-k16-L0-29': a file-name-safe name for a run's figures."""
    label = str(run_id["layers"]).replace(",", "_")
    lens = LENS_SUFFIX if run_id.get("tuned_lens") else ""
    seed = seed_suffix(int(run_id.get("seed", 0)))
    return f"{run_id['model']}-x{run_id['expansion_factor']}-k{run_id['k']}-L{label}{lens}{seed}"


def run_id_fields(run_id: Mapping[str, Any], required: Sequence[str]) -> list[pa.Field]:
    """The typed fields for `run_id`'s keys, refusing unknown or missing ones by name."""
    known = {f.name: f for f in RUN_ID_FIELDS}
    unknown = sorted(set(run_id) - set(known))
    missing = [name for name in required if name not in run_id]
    if unknown or missing:
        raise ValueError(
            f"run id {dict(run_id)} has unknown keys {unknown} / lacks {missing}; "
            f"expected keys from {list(known)}"
        )
    return [f for f in RUN_ID_FIELDS if f.name in run_id]
