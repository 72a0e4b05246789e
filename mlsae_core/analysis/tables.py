"""Analysis results -> `pyarrow.Table`s with explicit schemas, and the reference's CSVs.

Every table starts with the run-id columns it is keyed by (`mlsae_core.identity`: model,
expansion_factor, k, layers; model-level tables such as resid_cos_sim need only `model`),
repeated on every row, so Parquet files from many configs concatenate into one DuckDB view.
Columns are documented in docs/tables.md (one place); keep the two in step.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mlsae_core import atomic
from mlsae_core.identity import MODEL_COLUMNS, RUN_ID_COLUMNS, run_id_fields

if TYPE_CHECKING:
    from mlsae_core.analysis.dists import DistsResult
    from mlsae_core.analysis.examples import ExamplesResult
    from mlsae_core.analysis.geometry import ResidCosSim
    from mlsae_core.analysis.prompts import PromptHeatmap
    from mlsae_core.analysis.variance import VarianceResult

STAT_NAMES = ("mean", "var", "std", "sem")
# dists_summary's statistics of layer_std, and of layer_std / n_layers (`_rel`)
LAYER_STD_STATS = (*STAT_NAMES, *(f"{s}_rel" for s in STAT_NAMES))
I32, I64, F32, F64, STR = pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.string()

DISTS_LAYER_STD_CSV_COLUMNS = ("model_name", "n_layers", "expansion_factor", "k", *LAYER_STD_STATS)
MMCS_CSV_COLUMNS = ("model_name", "expansion_factor", "k", *STAT_NAMES)


def _table(
    run_id: Mapping[str, Any],
    columns: Mapping[str, tuple[pa.DataType, Any]],
    required: Sequence[str] = RUN_ID_COLUMNS,
) -> pa.Table:
    """Run-id columns (repeated) then `columns` (name -> (type, values)), explicit schema."""
    id_fields = run_id_fields(run_id, required)
    arrays = [pa.array(values, type=t) for t, values in columns.values()]
    n = len(arrays[0]) if arrays else 0
    id_arrays = [pa.repeat(pa.scalar(run_id[f.name], type=f.type), n) for f in id_fields]
    fields = [pa.field(name, t) for name, (t, _) in columns.items()]
    return pa.Table.from_arrays([*id_arrays, *arrays], schema=pa.schema([*id_fields, *fields]))


def _summary_table(
    run_id: Mapping[str, Any], types: Mapping[str, pa.DataType], summary: Mapping[str, Any]
) -> pa.Table:
    """One row: the `types` columns of a result's `summary()`."""
    return _table(run_id, {name: (t, [summary[name]]) for name, t in types.items()})


# ----- dists ---------------------------------------------------------------------------------
def latent_dists_table(result: DistsResult, run_id: Mapping[str, Any]) -> pa.Table:
    """One row per latent: its layer distribution's statistics (NaN for dead latents)."""
    return _table(
        run_id,
        {
            "latent": (I64, range(result.n_latents)),
            "layer_mean": (F64, result.layer_mean.numpy()),
            "layer_var": (F64, result.layer_var.numpy()),
            "layer_std": (F64, result.layer_std.numpy()),
            "count": (I64, result.count.round().long().numpy()),
            "total": (F64, result.total.numpy()),
            "n_layers_active": (I32, result.n_layers_active.int().numpy()),
            "live": (pa.bool_(), result.live.numpy()),
        },
    )


# Schema metadata of latent_layer_dists: what `dists_from_layer_table` needs to rebuild the
# DistsResult exactly (the rows alone omit silent latents and the token count).
DISTS_META_KEY = b"mlsae.dists"


def latent_layer_dists_table(
    result: DistsResult, run_id: Mapping[str, Any], nonzero_only: bool = True
) -> pa.Table:
    """Long form, one row per (layer, latent); by default only where the latent fired.

    This is the one persisted form of the layer distributions (for `mlsae analyse` and the
    pipeline alike); `dists_from_layer_table` reads it back.
    """
    import torch

    fired = result.counts > 0 if nonzero_only else torch.ones_like(result.counts, dtype=torch.bool)
    li, lat = fired.nonzero(as_tuple=True)
    layer_ids = torch.tensor(result.layers, dtype=torch.int32)
    table = _table(
        run_id,
        {
            "layer": (I32, layer_ids[li].numpy()),
            "layer_index": (I32, li.int().numpy()),
            "latent": (I64, lat.numpy()),
            "count": (I64, result.counts[li, lat].round().long().numpy()),
            "total": (F64, result.totals[li, lat].numpy()),
            "p": (F64, result.p[li, lat].numpy()),
        },
    )
    meta = {
        "layers": [int(x) for x in result.layers],
        "n_latents": result.n_latents,
        "n_tokens": int(result.n_tokens),
    }
    return table.replace_schema_metadata({DISTS_META_KEY: json.dumps(meta)})


def dists_from_layer_table(table: pa.Table) -> DistsResult:
    """The DistsResult a `latent_layer_dists_table` was made from (counts are integers and
    totals float64, so the round trip is exact)."""
    import torch

    from mlsae_core.analysis.dists import DistsResult

    raw = (table.schema.metadata or {}).get(DISTS_META_KEY)
    if raw is None:
        raise ValueError(
            "this latent_layer_dists table has no mlsae.dists schema metadata (written by an "
            "older mlsae): recompute it with `mlsae dists` or rematerialize `evaluation`"
        )
    meta = json.loads(raw)
    shape = (len(meta["layers"]), int(meta["n_latents"]))
    counts = torch.zeros(shape, dtype=torch.float64)
    totals = torch.zeros(shape, dtype=torch.float64)
    cols = table.select(["layer_index", "latent", "count", "total"]).to_pydict()
    li = torch.tensor(cols["layer_index"], dtype=torch.long)
    lat = torch.tensor(cols["latent"], dtype=torch.long)
    counts[li, lat] = torch.tensor(cols["count"], dtype=torch.float64)
    totals[li, lat] = torch.tensor(cols["total"], dtype=torch.float64)
    return DistsResult(list(meta["layers"]), counts, totals, int(meta["n_tokens"]))


def dists_summary_table(result: DistsResult, run_id: Mapping[str, Any]) -> pa.Table:
    """One row per config: stats of layer_std over live latents (and / n_layers)."""
    types = {"n_layers": I32, "n_latents": I64, "n_live": I64, "n_tokens": I64}
    return _summary_table(run_id, types | dict.fromkeys(LAYER_STD_STATS, F64), result.summary())


# ----- variance ------------------------------------------------------------------------------
# the original code's formula (analysis.variance.VarianceResult.original_summary)
ORIGINAL_STATS = ("orig_exp_var_l_tf", "orig_exp_var_l_f", "orig_var_l", "orig_rel_var_f",
                  "orig_rel_var_t", "orig_ratio")  # fmt: skip
_VARIANCE_STATS = ("token_var_mean", "aggregate_var_mean", "ratio", "token_var_weighted",
                   "aggregate_var_weighted", "ratio_weighted", "mean_layers_per_token",
                   *ORIGINAL_STATS)  # fmt: skip


def layer_variance_table(result: VarianceResult, run_id: Mapping[str, Any]) -> pa.Table:
    """One row per config: token-level vs aggregate layer variance (analysis.variance)."""
    types = {"n_layers": I32, "n_live": I64, "n_tokens": I64}
    return _summary_table(run_id, types | dict.fromkeys(_VARIANCE_STATS, F64), result.summary())


def latent_variance_table(result: VarianceResult, run_id: Mapping[str, Any]) -> pa.Table:
    """One row per latent: V_tok, V_agg, total activation, (token, latent) pairs."""
    return _table(
        run_id,
        {
            "latent": (I64, range(int(result.weight.numel()))),
            "token_var": (F64, result.token_var.numpy()),
            "aggregate_var": (F64, result.aggregate_var.numpy()),
            "weight": (F64, result.weight.numpy()),
            "pairs": (I64, result.pairs.round().long().numpy()),
        },
    )


# ----- examples ------------------------------------------------------------------------------
def max_examples_table(
    result: ExamplesResult,
    run_id: Mapping[str, Any],
    doc_index: Any | None = None,
    documents: Sequence[Any] | None = None,
) -> pa.Table:
    """One row per (latent, layer, rank) with its clipped context window.

    doc_index [R, P] and documents (`TokenChunks.doc_index` / `.documents`) add the source
    document id and genre of the example token; without them those columns are null.
    """
    import numpy as np

    valid = result.context_valid.numpy()  # [M, C]
    off = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]), type=I32)
    flat_ids = result.context_ids.numpy()[valid]  # row-major: each example's window in order
    flat_acts = result.context_acts.numpy()[valid].astype(np.float32)
    vocab = np.asarray(sorted(result.strings), dtype=np.int64)
    lookup = pa.array([result.strings[int(i)] for i in vocab], type=STR)

    def strings_of(ids: Any) -> pa.Array:
        return lookup.take(pa.array(np.searchsorted(vocab, ids), type=I64))

    doc_col: list[str | None] = [None] * len(result)
    genre_col: list[str | None] = [None] * len(result)
    if doc_index is not None and documents is not None:
        idx = doc_index[result.row, result.pos].tolist()
        doc_col = [documents[i].id if i >= 0 else None for i in idx]
        genre_col = [getattr(documents[i], "genre", None) if i >= 0 else None for i in idx]
    columns = {
        "latent": (I64, result.latent.numpy()),
        "layer": (I32, result.layer.int().numpy()),
        "rank": (I32, result.rank.int().numpy()),
        "activation": (F32, result.activation.float().numpy()),
        "row": (I64, result.row.numpy()),
        "pos": (I32, result.pos.int().numpy()),
        "token_id": (I64, result.token_id.numpy()),
        "token": (STR, strings_of(result.token_id.numpy())),
        "centre": (I32, result.centre.int().numpy()),
        "context_ids": (pa.list_(I64), pa.ListArray.from_arrays(off, pa.array(flat_ids, I64))),
        "context_tokens": (pa.list_(STR), pa.ListArray.from_arrays(off, strings_of(flat_ids))),
        "context_activations": (
            pa.list_(F32),
            pa.ListArray.from_arrays(off, pa.array(flat_acts, type=F32)),
        ),
        "document": (STR, doc_col),
        "genre": (STR, genre_col),
    }
    return _table(run_id, columns)


# ----- geometry ------------------------------------------------------------------------------
def resid_cos_sim_table(result: ResidCosSim, run_id: Mapping[str, Any]) -> pa.Table:
    """One row per layer: its norm stats and the cosine with the next layer (null for the last)."""
    cols: dict[str, Any] = {
        "layer": (I32, result.layers),
        "next_layer": (I32, [*result.layers[1:], None]),
    }
    cols |= {f"cos_{s}": (F64, [*result.cos[s].tolist(), None]) for s in STAT_NAMES}
    cols |= {f"norm_{s}": (F64, result.norm[s].tolist()) for s in STAT_NAMES}
    cols["n_tokens"] = (I64, [result.n_tokens] * len(result.layers))
    return _table(run_id, cols, required=MODEL_COLUMNS)


def mmcs_table(
    summary: Mapping[str, float], run_id: Mapping[str, Any], reference: str = "self"
) -> pa.Table:
    """One row: MMCS stats of a dictionary against itself ("self") or another (its label)."""
    cols = {"reference": (STR, [reference]), "n_latents": (I64, [int(summary["n"])])}
    return _table(run_id, cols | {s: (F64, [float(summary[s])]) for s in STAT_NAMES})


def prompt_heatmap_table(heat: PromptHeatmap, run_id: Mapping[str, Any]) -> pa.Table:
    """Long form of the prompt heatmap: one row per (layer, latent) cell."""
    import numpy as np

    n_layers, m = heat.matrix.shape
    li, ci = np.meshgrid(np.arange(n_layers), np.arange(m), indexing="ij")
    li, ci = li.ravel(), ci.ravel()
    return _table(
        run_id,
        {
            "prompt": (STR, [heat.prompt] * (n_layers * m)),
            "latent": (I64, heat.latents.numpy()[ci]),
            "order": (I32, ci.astype(np.int32)),
            "layer": (I32, np.asarray(heat.layers, dtype=np.int32)[li]),
            "value": (F64, heat.matrix.numpy()[li, ci]),
            "raw": (F64, heat.raw.numpy()[li, ci]),
        },
    )


# ----- the reference's CSVs ------------------------------------------------------------------
def _write_csv(
    path: str | PathLike[str], columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"CSV row {dict(row)} lacks columns {missing}")
        writer.writerow({c: ("nan" if _isnan(row[c]) else row[c]) for c in columns})
    atomic.write_text(path, buf.getvalue())


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def write_dists_layer_std_csv(path: str | PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """The reference's dists_layer_std.csv (columns DISTS_LAYER_STD_CSV_COLUMNS), atomically."""
    _write_csv(path, DISTS_LAYER_STD_CSV_COLUMNS, rows)


def write_mmcs_csv(path: str | PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """The reference's mmcs.csv (columns MMCS_CSV_COLUMNS), atomically."""
    _write_csv(path, MMCS_CSV_COLUMNS, rows)


# ----- the reference's test_*.csv ------------------------------------------------------------
# Our metric column -> the reference's W&B-style name (one column per layer plus `avg`).
REFERENCE_TEST_METRICS = {
    "fvu": "train/fvu",
    "mse": "train/mse",
    "l1": "train/l1",
    "l0": "train/l0",
    "dce": "val/loss/delta",
    "kl": "val/logit/kldiv",
    "logit_mse": "val/logit/mse",
    "loss_recovered": "val/loss/recovered",
}


def reference_test_rows(metric_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long test metrics (one row per config and layer, as `test_metrics`) -> the reference's
    wide rows: model_name, expansion_factor, k, tuned_lens, layer (the trained layer of a
    single-layer SAE, empty for an MLSAE), n_latents, then `<metric>/avg`, `<metric>/layer_<l>`.
    """
    wide: dict[tuple, dict[str, Any]] = {}
    for r in metric_rows:
        lens = bool(r.get("tuned_lens", False))
        key = (r["model"], int(r["expansion_factor"]), int(r["k"]), str(r["layers"]), lens)
        layers = str(r["layers"])
        single = layers.isdigit()
        row = wide.setdefault(
            key,
            {
                "model_name": r["model"],
                "expansion_factor": int(r["expansion_factor"]),
                "k": int(r["k"]),
                "tuned_lens": lens,
                "layer": int(layers) if single else None,
                "n_latents": r.get("n_latents"),
            },
        )
        suffix = "avg" if r["layer"] == "avg" else f"layer_{r['layer']}"
        for ours, theirs in REFERENCE_TEST_METRICS.items():
            if ours in r:
                row[f"{theirs}/{suffix}"] = r[ours]
    return list(wide.values())


def write_reference_test_csvs(
    metric_rows: Sequence[Mapping[str, Any]], out_dir: str | PathLike[str]
) -> list[Any]:
    """test.csv plus, per model, test_<model>_k.csv (MLSAEs at one expansion factor: 64 when
    swept, else the largest), test_<model>_expansion_factor.csv (MLSAEs at one k: 32 when
    swept, else the largest) and test_<model>_layer.csv (single-layer SAEs) — the
    reference's files, same column names; cells a config did not measure are empty."""
    from pathlib import Path

    out = Path(out_dir)
    rows = sorted(
        reference_test_rows(metric_rows),
        key=lambda r: (r["model_name"], r["expansion_factor"], r["k"], r["tuned_lens"],
                       r["layer"] is not None, r["layer"] or 0),
    )  # fmt: skip
    columns: list[str] = ["model_name", "expansion_factor", "k", "tuned_lens", "layer",
                          "n_latents"]  # fmt: skip
    for r in rows:
        columns += [c for c in r if c not in columns]

    def write(path: Path, subset: list[dict[str, Any]]) -> Path:
        full = [{c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in subset]
        _write_csv(path, columns, full)
        return path

    written = [write(out / "test.csv", rows)]
    for model in sorted({r["model_name"] for r in rows}):
        mine = [r for r in rows if r["model_name"] == model]
        multi = [r for r in mine if r["layer"] is None]
        if multi:
            efs, ks = {r["expansion_factor"] for r in multi}, {r["k"] for r in multi}
            ef = 64 if 64 in efs else max(efs)
            k = 32 if 32 in ks else max(ks)
            written.append(write(out / f"test_{model}_k.csv",
                                 [r for r in multi if r["expansion_factor"] == ef]))  # fmt: skip
            written.append(write(out / f"test_{model}_expansion_factor.csv",
                                 [r for r in multi if r["k"] == k]))  # fmt: skip
        single = [r for r in mine if r["layer"] is not None]
        if single:
            written.append(write(out / f"test_{model}_layer.csv", single))
    return written
