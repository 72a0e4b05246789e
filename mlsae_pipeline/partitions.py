"""Partitions computed from the sweep file at definitions load (YAML parsing only).

- `model` partitions (one per model) for the base model, its corpus and resid_cos_sim;
- `config` partitions, two dimensions `model` x `sae` (e.g. `smollm2|x2-k16-Lall`), for
  everything per SAE config. A config asset reads its model's assets through
  `MultiToSingleDimensionPartitionMapping("model")`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dagster as dg

from mlsae_pipeline.sweep import Sweep

MODEL_DIM = "model"
SAE_DIM = "sae"


@dataclass(frozen=True)
class SweepPartitions:
    models: dg.StaticPartitionsDefinition
    configs: dg.MultiPartitionsDefinition

    @property
    def to_model(self) -> dg.PartitionMapping:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)  # stable in practice since 1.5
            return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=MODEL_DIM)


def sweep_partitions(sweep: Sweep) -> SweepPartitions:
    models = dg.StaticPartitionsDefinition(sweep.model_keys)
    configs = dg.MultiPartitionsDefinition(
        {MODEL_DIM: models, SAE_DIM: dg.StaticPartitionsDefinition(sweep.sae_keys)}
    )
    return SweepPartitions(models, configs)


def config_key(model: str, sae: str) -> str:
    """The string form of a config partition key, as the CLI and the UI show it."""
    return str(dg.MultiPartitionKey({MODEL_DIM: model, SAE_DIM: sae}))


def split_config_key(key: str) -> tuple[str, str]:
    """'smollm2|x2-k16-Lall' -> ('smollm2', 'x2-k16-Lall'); a `dg.MultiPartitionKey` is such
    a string too (dimensions ordered by name: model < sae)."""
    model, sae = str(key).split("|", 1)
    return model, sae
