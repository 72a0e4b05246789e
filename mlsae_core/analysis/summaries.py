"""Tables over many runs: test_summary, dists_layer_std, mmcs, single_layer_comparison.

Tables in, tables out. The pipeline's summary assets and `mlsae figures` call these same
functions, so a cross-config number means one thing on both paths; the reference's CSVs are
derived from the tables they return (`*_csv_rows`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from mlsae_core.analysis import geometry
from mlsae_core.analysis.tables import (
    DISTS_LAYER_STD_CSV_COLUMNS,
    LAYER_STD_STATS,
    MMCS_CSV_COLUMNS,
    mmcs_table,
)
from mlsae_core.identity import RUN_ID_COLUMNS, RUN_ID_FIELDS, is_single_layer, run_id_of
from mlsae_core.sae import MLSAE

# Metrics of single_layer_comparison: the MLSAE's value at a layer next to the baseline's.
COMPARE_METRICS = ("mse", "fvu", "fvu_nofirst", "fvu_standardized", "first_share", "l0", "dead", "dce",
                   "kl", "loss_recovered")  # fmt: skip


def n_layers_of(label: str) -> int:
    """Layers named by a layers label: '0-3' -> 4, '0,5,10' -> 3, '7' -> 1."""
    if "-" in label:
        lo, hi = label.split("-")
        return int(hi) - int(lo) + 1
    return len(label.split(","))


def _sorted(table: pa.Table, *extra: str) -> pa.Table:
    return table.sort_by([(c, "ascending") for c in (*RUN_ID_COLUMNS, *extra)])


# ----- test_summary ------------------------------------------------------------------------
def summarize_test_metrics(test_metrics: pa.Table) -> pa.Table:
    """One row per config: its `avg` test-metrics row, with n_layers after the run id."""
    avg = test_metrics.filter(pc.equal(test_metrics.column("layer"), "avg")).drop(["layer"])
    labels = avg.column("layers").to_pylist()
    n_layers = pa.array([n_layers_of(x) for x in labels], pa.int64())
    avg = avg.add_column(len(RUN_ID_COLUMNS), "n_layers", n_layers)
    return _sorted(avg)


# ----- dists_layer_std ---------------------------------------------------------------------
DISTS_LAYER_STD_COLUMNS = (*RUN_ID_COLUMNS, "n_layers", "n_latents", "n_live", *LAYER_STD_STATS)


def dists_layer_std(dists_summary: pa.Table) -> pa.Table:
    """The paper's layer_std table: every run's `dists_summary` row (analysis.dists.describe
    of live latents' layer_std, and of layer_std / n_layers), one row per config."""
    return _sorted(dists_summary.select(list(DISTS_LAYER_STD_COLUMNS)))


def _reference_rows(table: pa.Table, columns: Sequence[str]) -> list[dict[str, Any]]:
    """`table`'s rows under the reference CSV's `columns` (its `model_name` is our `model`)."""
    return [{c: r["model" if c == "model_name" else c] for c in columns} for r in table.to_pylist()]


def dists_layer_std_csv_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of the reference's dists_layer_std.csv (tables.write_dists_layer_std_csv)."""
    return _reference_rows(table, DISTS_LAYER_STD_CSV_COLUMNS)


# ----- mmcs --------------------------------------------------------------------------------
def run_decoder(directory: str | Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(run-id columns, decoder [d, n_latents]) of a checkpoint directory."""
    sae = MLSAE.from_pretrained(directory)
    run_id = run_id_of(sae)
    return run_id, sae.decoder.weight.detach()


# What a single-layer baseline shares with the MLSAE it is compared with (all but the layers
# and the training seed: every seed of a baseline is compared).
_SAME_CONFIG = tuple(c for c in RUN_ID_COLUMNS if c not in ("layers", "seed"))


def _same_dictionary_size(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(c, False) == b.get(c, False) for c in _SAME_CONFIG)


def _baseline_label(run_id: Mapping[str, Any]) -> str:
    """mmcs's reference for a single-layer SAE: 'layers=9', or 'layers=9,seed=1'."""
    seed = int(run_id.get("seed", 0))
    return f"layers={run_id['layers']}" + (f",seed={seed}" if seed else "")


def mmcs(decoders: Sequence[tuple[Mapping[str, Any], torch.Tensor]]) -> pa.Table:
    """MMCS of every dictionary within itself (reference 'self') and, for each MLSAE, against
    every single-layer SAE of the same model, expansion factor, k and inputs (plain or
    tuned-lens) ('layers=<l>')."""
    if not decoders:
        raise ValueError("mmcs needs at least one (run id, decoder) pair")
    out = []
    for run_id, dec in decoders:
        out.append(mmcs_table(geometry.mmcs(dec), run_id, "self"))
        if is_single_layer(run_id["layers"]):
            continue
        for other_run_id, other in decoders:
            if _same_dictionary_size(run_id, other_run_id) and is_single_layer(
                other_run_id["layers"]
            ):
                ref = _baseline_label(other_run_id)
                out.append(mmcs_table(geometry.mmcs(dec, other), run_id, ref))
    return _sorted(pa.concat_tables(out), "reference")


def mmcs_csv_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of the reference's mmcs.csv: the 'self' rows (tables.write_mmcs_csv)."""
    return _reference_rows(table.filter(pc.equal(table["reference"], "self")), MMCS_CSV_COLUMNS)


# ----- single_layer_comparison -------------------------------------------------------------
SINGLE_LAYER_COMPARISON_SCHEMA = pa.schema(
    [
        *RUN_ID_FIELDS,
        pa.field("layer", pa.int32()),
        *[
            pa.field(name, pa.float64())
            for m in COMPARE_METRICS
            for name in (f"mlsae_{m}", f"single_{m}", f"single_{m}_std")
        ],
        pa.field("n_single_seeds", pa.int32()),
        pa.field("fvu_ratio", pa.float64()),
    ]
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values, or any NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    spread = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), spread


def _value(row: Mapping[str, Any], metric: str) -> float:
    """row[metric], NaN where a stored table predates the metric (absent or null)."""
    v = row.get(metric)
    return math.nan if v is None else float(v)


def single_layer_comparison(test_metrics: pa.Table) -> pa.Table:
    """At each layer l with a single-layer SAE (same model, expansion factor, k and inputs),
    the MLSAE's test metrics at l next to the baselines' mean over their training seeds, with
    the seeds' sample standard deviation (NaN for one seed); fvu_ratio = mlsae_fvu /
    single_fvu. A metric a stored table predates is NaN."""
    by_cfg: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in test_metrics.to_pylist():
        by_cfg.setdefault(tuple(r[c] for c in RUN_ID_COLUMNS), {})[r["layer"]] = r
    runs = [
        (dict(zip(RUN_ID_COLUMNS, key, strict=True)), rows) for key, rows in sorted(by_cfg.items())
    ]
    rows = []
    for run_id, layer_rows in runs:
        if is_single_layer(run_id["layers"]):
            continue
        baselines: dict[str, list[dict[str, Any]]] = {}
        for single, srows in runs:
            layer = single["layers"]
            if (
                _same_dictionary_size(run_id, single)
                and is_single_layer(layer)
                and layer in layer_rows
            ):
                baselines.setdefault(layer, []).append(srows[layer])
        for layer, seeds in sorted(baselines.items(), key=lambda item: int(item[0])):
            m = layer_rows[layer]
            row: dict[str, Any] = {**run_id, "layer": int(layer), "n_single_seeds": len(seeds)}
            for metric in COMPARE_METRICS:
                row[f"mlsae_{metric}"] = _value(m, metric)
                row[f"single_{metric}"], row[f"single_{metric}_std"] = _mean_std(
                    [_value(s, metric) for s in seeds]
                )
            row["fvu_ratio"] = m["fvu"] / row["single_fvu"] if row["single_fvu"] else math.nan
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=SINGLE_LAYER_COMPARISON_SCHEMA)
