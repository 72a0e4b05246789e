"""Asset checks: no NaN, FVU and dead fraction within the sweep's bounds, examples present for
every live latent, layer distributions summing to 1.

The logic is plain functions over pyarrow tables returning `CheckOutcome`s, so the tests can
plant a NaN and see a check fail without running a model. Per-config checks run inside the
evaluation step (`check_specs` of the multi-asset: the tables are in memory there,
`evaluation_checks`); checks on
the cross-config tables are standalone `@asset_check`s that read the Parquet files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from mlsae_pipeline.sweep import CheckBounds

RECON_COLUMNS = ("mse", "fvu", "l0", "l1", "dead")
SPLICE_COLUMNS = ("dce", "kl", "logit_mse", "ce_clean", "ce_spliced", "ce_zero")


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def result(self, asset_key: str) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            asset_key=asset_key,
            check_name=self.name,
            passed=bool(self.passed),
            severity=dg.AssetCheckSeverity.ERROR,
            description=self.description,  # the reason, shown beside the check in the UI
            metadata={"detail": self.description, **self.metadata},
        )


def _nan_count(table: Any, column: str) -> int:
    """NaN or null values in a numeric column (nulls count: a metric must exist)."""
    import numpy as np

    col = table.column(column)
    nulls = col.null_count
    values = col.drop_null().to_numpy(zero_copy_only=False).astype(float)
    return int(nulls + np.isnan(values).sum()) if len(values) else int(nulls)


def no_nan(table: Any, columns: tuple[str, ...] | list[str], name: str = "no_nan") -> CheckOutcome:
    present = [c for c in columns if c in table.column_names]
    bad = {c: n for c in present if (n := _nan_count(table, c))}
    if table.num_rows == 0:
        return CheckOutcome(name, False, "the table is empty", {"rows": 0})
    return CheckOutcome(
        name,
        not bad,
        f"NaN in {bad}" if bad else f"no NaN in {len(present)} columns",
        {"rows": table.num_rows, "nan_counts": str(bad)},
    )


def _avg_rows(table: Any) -> list[dict[str, Any]]:
    """The per-config averages: a test_metrics table's "avg" rows, or a summary's rows."""
    rows = table.to_pylist()
    return [r for r in rows if r["layer"] == "avg"] if "layer" in table.column_names else rows


def fvu_in_bounds(table: Any, bounds: CheckBounds) -> CheckOutcome:
    rows = _avg_rows(table)
    bad = [
        r
        for r in rows
        if not (
            isinstance(r["fvu"], float)
            and not math.isnan(r["fvu"])
            and bounds.fvu_min <= r["fvu"] <= bounds.fvu_max
        )
    ]
    values = [round(r["fvu"], 4) for r in rows]
    return CheckOutcome(
        "fvu_in_bounds",
        bool(rows) and not bad,
        f"average FVU {values} must lie in [{bounds.fvu_min}, {bounds.fvu_max}] (sweep checks:)",
        {"fvu": str(values)},
    )


def dead_in_bounds(table: Any, bounds: CheckBounds) -> CheckOutcome:
    rows = _avg_rows(table)
    values = [r["dead"] for r in rows]
    bad = [v for v in values if not (isinstance(v, float) and 0 <= v <= bounds.dead_max)]
    return CheckOutcome(
        "dead_fraction_in_bounds",
        bool(rows) and not bad,
        f"dead fraction {values} must be <= {bounds.dead_max} (sweep checks:)",
        {"dead": str(values)},
    )


def test_metrics_checks(table: Any, bounds: CheckBounds, spliced: bool) -> list[CheckOutcome]:
    cols = list(RECON_COLUMNS) + (list(SPLICE_COLUMNS) if spliced else [])
    return [no_nan(table, cols), fvu_in_bounds(table, bounds), dead_in_bounds(table, bounds)]


def latent_dists_checks(table: Any, p_sums: Any | None) -> list[CheckOutcome]:
    """No NaN for live latents; p sums to 1 over layers for every live latent."""
    import numpy as np

    live = table.filter(table.column("live"))
    out = [no_nan(live, ("layer_mean", "layer_var", "layer_std", "total"))]
    if p_sums is not None:
        live_ids = np.asarray(live.column("latent").to_numpy(), dtype=np.int64)
        sums = np.asarray(p_sums, dtype=np.float64)[live_ids]
        err = float(np.max(np.abs(sums - 1.0))) if len(sums) else 0.0
        ok = len(sums) > 0 and err < 1e-6
        out.append(
            CheckOutcome(
                "dists_sum_to_one",
                ok,
                f"max |sum_l p[l, j] - 1| over {len(sums)} live latents = {err:.3g}",
                {"max_abs_error": err, "n_live": len(sums)},
            )
        )
    return out


def max_examples_checks(examples: Any, dists: Any) -> list[CheckOutcome]:
    """Every live latent has at least one example, and no activation is NaN."""
    live = set(dists.filter(dists.column("live")).column("latent").to_pylist())
    have = set(examples.column("latent").to_pylist())
    missing = sorted(live - have)
    return [
        CheckOutcome(
            "examples_for_live_latents",
            bool(live) and not missing,
            f"{len(missing)} of {len(live)} live latents have no max-activating example",
            {"n_live": len(live), "missing": str(missing[:20])},
        ),
        no_nan(examples, ("activation",), name="examples_no_nan"),
    ]


def evaluation_checks(
    tables: dict[str, Any], bounds: CheckBounds, spliced: bool
) -> dict[str, list[CheckOutcome]]:
    """Every per-config check, on the tables of one evaluation pass (by asset)."""
    import torch

    from mlsae_core.analysis.tables import dists_from_layer_table

    dists = dists_from_layer_table(tables["latent_layer_dists"])
    p_sums = torch.nan_to_num(dists.p, nan=0.0).sum(0).numpy()
    return {
        "test_metrics": test_metrics_checks(tables["test_metrics"], bounds, spliced),
        "latent_dists": latent_dists_checks(tables["latent_dists"], p_sums),
        "max_examples": max_examples_checks(tables["max_examples"], tables["latent_dists"]),
    }
