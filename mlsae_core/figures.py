"""Matplotlib renderers for the analyses: PNG for the UI, PDF for papers (docs/method.md §5).

Every renderer takes an output path stem (`.../dists_heatmap`; a .png/.pdf suffix is dropped),
writes `<stem>.png` and `<stem>.pdf` atomically (temporary file, then rename), records them in
the directory's manifest (`atomic.record`) and returns the paths written. Matplotlib is imported lazily with the Agg backend, so importing this module
is cheap and works without a display.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae_core.atomic import atomic_path, record

if TYPE_CHECKING:
    import pyarrow as pa
    from matplotlib.figure import Figure

    from mlsae_core.analysis.dists import DistsResult
    from mlsae_core.analysis.geometry import ResidCosSim, SimDistHistogram
    from mlsae_core.analysis.prompts import PromptHeatmap

logger = logging.getLogger(__name__)

# A single-column paper figure is ~3.3 in wide; 5 x 3.2 in at 200 dpi reads well both ways.
FIGSIZE = (5.0, 3.2)
DPI = 200
FORMATS = ("png", "pdf")
SUMMARY_METRICS = ("fvu", "mse", "l0", "dce", "kl")
METRIC_LABELS = {
    "fvu": "FVU",
    "mse": "MSE",
    "l0": "L0",
    "l1": "L1",
    "dce": "ΔCE (nats)",
    "kl": "KL divergence (nats)",
    "dead": "dead fraction",
    "loss_recovered": "loss recovered",
    "logit_mse": "logit MSE",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8})
    return plt


def _axes() -> tuple[Figure, Any]:
    """A new single-column figure and its axes."""
    return _plt().subplots(figsize=FIGSIZE)


def save_figure(fig: Figure, path: str | PathLike[str], title: str | None = None) -> list[Path]:
    """Write `fig` (titled on its first axes, if `title`) as PNG and PDF beside each other,
    each atomically and recorded in the directory's manifest; close it."""
    plt = _plt()
    if title:
        fig.axes[0].set_title(title)
    stem = Path(path)
    if stem.suffix.lower() in {f".{fmt}" for fmt in FORMATS}:
        stem = stem.with_suffix("")  # "heatmap.png" -> "heatmap"; "x64.k32" is kept whole
    written = []
    try:
        fig.tight_layout()
        for fmt in FORMATS:
            out = stem.with_name(f"{stem.name}.{fmt}")
            with atomic_path(out) as tmp:
                fig.savefig(tmp, format=fmt, dpi=DPI)
            written.append(out)
    finally:
        plt.close(fig)
    record(stem.parent, [p.name for p in written])
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _layer_ticks(ax: Any, layers: Sequence[int], axis: str = "y") -> None:
    """Tick at most ~10 layers, labelled with the actual block ids."""
    step = max(1, math.ceil(len(layers) / 10))
    pos = list(range(0, len(layers), step))
    getattr(ax, f"set_{axis}ticks")(pos, [str(layers[i]) for i in pos])


def _layer_heatmap(
    m: Any, layers: Sequence[int], what: str, title: str | None, path: str | PathLike[str]
) -> list[Path]:
    """A layers x latents image of activation fractions, `what` naming the latents shown."""
    fig, ax = _axes()
    vmax = float(m.max()) if m.size else 1.0
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax)
    ax.invert_yaxis()
    ax.set_xlabel(f"latent (sorted by mean layer; {m.shape[1]} {what})")
    ax.set_ylabel("layer")
    _layer_ticks(ax, layers)
    fig.colorbar(im, ax=ax, label="fraction of activation at layer")
    return save_figure(fig, path, title)


def dists_heatmap(
    result: DistsResult, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """p[layer, latent] for live latents sorted by layer_mean: layers x latents image."""
    return _layer_heatmap(result.p[:, result.order()].numpy(), result.layers, "live", title, path)


def prompt_heatmap_figure(
    heat: PromptHeatmap, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """The prompt heatmap: normalised activation per (layer, latent), latents by mean layer."""
    title = title or _shorten(heat.prompt)
    return _layer_heatmap(heat.matrix.numpy(), heat.layers, "active", title, path)


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def layer_mean_histogram(
    result: DistsResult, path: str | PathLike[str], bins: int = 30, title: str | None = None
) -> list[Path]:
    """Histogram of each live latent's mean layer."""
    counts, edges = result.histogram(bins)
    fig, ax = _axes()
    ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
    ax.set_xlabel("mean layer of latent (layer index)")
    ax.set_ylabel("number of latents")
    return save_figure(fig, path, title)


def resid_cos_sim_figure(
    result: ResidCosSim, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """Mean cosine similarity of centred residuals at adjacent layers (± std), and norms."""
    plt = _plt()
    x = list(range(len(result.layers) - 1))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]))
    mean, std = result.cos["mean"].numpy(), result.cos["std"].numpy()
    ax.plot(x, mean, marker="o", ms=3)
    ax.fill_between(x, mean - std, mean + std, alpha=0.25)
    _layer_ticks(ax, result.layers[:-1], axis="x")
    ax.set_xlabel("layer l (pair l → next layer)")
    ax.set_ylabel("cosine similarity (centred)")
    ax.set_ylim(min(0.0, float(mean.min() - std.max())) if len(x) else 0.0, 1.0)
    nm, ns = result.norm["mean"].numpy(), result.norm["std"].numpy()
    xl = list(range(len(result.layers)))
    ax2.plot(xl, nm, marker="o", ms=3, color="tab:orange")
    # Norms are positive and heavy-tailed (a few tokens carry huge norms): log scale, and the
    # ± std band clipped above zero rather than drawn into negative norms.
    low = (nm - ns).clip(min=nm * 0.05)
    ax2.fill_between(xl, low, nm + ns, alpha=0.25, color="tab:orange")
    ax2.set_yscale("log")
    _layer_ticks(ax2, result.layers, axis="x")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("‖x‖ (mean ± std, log scale)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def training_curve_figure(
    history: Sequence[Mapping[str, Any]], path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """Training FVU and dead fraction against training tokens (rows of history.parquet)."""
    fig, ax = _axes()
    xs = [r["tokens"] for r in history]
    ax.plot(xs, [r["fvu"] for r in history], marker="o", ms=2, label="FVU (train)")
    ax.plot(xs, [r["dead_fraction"] for r in history], ls="--", label="dead fraction")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("value")
    ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def decoder_sim_figure(
    hist: SimDistHistogram, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """2-D histogram: decoder cosine similarity vs distance between latents' mean layers."""
    import numpy as np
    from matplotlib.colors import LogNorm

    fig, ax = _axes()
    counts = np.ma.masked_equal(hist.counts.T, 0)  # [cos, dist]
    vmax = max(float(hist.counts.max()), 1.0)
    im = ax.pcolormesh(
        hist.dist_edges, hist.cos_edges, counts, cmap="viridis", norm=LogNorm(vmin=1, vmax=vmax)
    )
    centres = (hist.dist_edges[:-1] + hist.dist_edges[1:]) / 2
    ax.plot(centres, hist.mean_cos_by_dist, color="tab:red", lw=1, label="mean cosine")
    ax.set_xlabel("|mean layer i − mean layer j|")
    ax.set_ylabel("decoder cosine similarity")
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax, label="pairs of latents" + (" (sampled)" if hist.sampled else ""))
    return save_figure(fig, path, title)


def summary_figures(
    table: pa.Table, out_dir: str | PathLike[str], metrics: Sequence[str] = SUMMARY_METRICS
) -> list[Path]:
    """For each metric: one plot vs k (a line per expansion factor), one vs expansion factor
    (a line per k), from the test_summary table (model, expansion_factor, k, layers, metric
    columns). Distinct (model, layers) get separate line styles. Files: test_<metric>_by_k /
    test_<metric>_by_expansion.
    """
    rows = table.to_pylist()
    if not rows:
        raise ValueError("no test-summary rows to plot")
    out_dir = Path(out_dir)
    groups = sorted({(str(r["model"]), str(r["layers"])) for r in rows})
    styles = ["-", "--", ":", "-."]
    written: list[Path] = []
    for metric in metrics:
        have = [r for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
        if not have:
            logger.warning("no values for metric %s; skipping its figures", metric)
            continue
        for x_key, line_key, suffix, x_label in (
            ("k", "expansion_factor", "by_k", "k (active latents)"),
            ("expansion_factor", "k", "by_expansion", "expansion factor"),
        ):
            fig, ax = _axes()
            for gi, (model, layers) in enumerate(groups):
                style = styles[gi % len(styles)]
                sub = [r for r in have if (str(r["model"]), str(r["layers"])) == (model, layers)]
                for value in sorted({int(r[line_key]) for r in sub}):
                    pts = sorted(
                        (int(r[x_key]), float(r[metric])) for r in sub if int(r[line_key]) == value
                    )
                    label = f"{line_key.replace('_', ' ')} {value}"
                    if len(groups) > 1:
                        label += f" ({model}, layers {layers})"
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, ls=style, label=label)
            ax.set_xscale("log", base=2)
            xs = sorted({int(r[x_key]) for r in have})
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
            ax.set_xlabel(x_label)
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.legend(fontsize=6)
            written += save_figure(fig, out_dir / f"test_{metric}_{suffix}")
    return written


def _size_label(r: Mapping[str, Any]) -> str:
    lens = " lens" if r.get("tuned_lens") else ""
    return f"{r['model']} x{r['expansion_factor']} k{r['k']}{lens}"


def fvu_by_layer_figure(
    test_metrics: pa.Table, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """Per-layer FVU of each MLSAE (a line) and of the single-layer SAEs trained on a layer (a
    marker of the same colour per baseline and seed), from test_metrics rows."""
    rows = [r for r in test_metrics.to_pylist() if r["layer"] != "avg"]
    if not rows:
        raise ValueError("no per-layer test metrics to plot")
    fig, ax = _axes()
    colours: dict[str, Any] = {}
    for multi in (True, False):  # lines first, so baselines take their MLSAE's colour
        for label in sorted({_size_label(r) for r in rows}):
            by_run: dict[str, list] = {}
            for r in rows:
                if _size_label(r) == label and (not str(r["layers"]).isdigit()) == multi:
                    run = f"{r['layers']} seed {r.get('seed', 0)}" if multi else "baselines"
                    by_run.setdefault(run, []).append((int(r["layer"]), r["fvu"]))
            for _, pts in sorted(by_run.items()):
                pts.sort()
                kw = {"color": colours[label]} if label in colours else {}
                if multi:
                    (line,) = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label, **kw)
                    colours.setdefault(label, line.get_color())
                else:
                    ax.plot(*zip(*pts, strict=True), ls="none", marker="s", ms=6, mfc="none",
                            label=f"{label} single-layer", **kw)  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("FVU (test)")
    ax.legend(fontsize=6)
    return save_figure(fig, path, title)


def variance_ratio_figure(
    layer_variance: pa.Table, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """Aggregate / token-level layer variance per config: ours and the original code's
    formula (layer_variance's `ratio` and `orig_ratio`), log scale."""
    rows = [r for r in layer_variance.to_pylist() if r["n_layers"] > 1]
    if not rows:
        raise ValueError("no multi-layer layer_variance rows to plot")
    fig, ax = _axes()
    x = list(range(len(rows)))
    ax.plot(x, [r["ratio"] for r in rows], "o", label="ours (law of total variance)")
    ax.plot(x, [r["orig_ratio"] for r in rows], "s", mfc="none", label="original code's formula")
    ax.set_yscale("log")
    ax.set_xticks(x, [_size_label(r) for r in rows], rotation=30, ha="right", fontsize=6)
    ax.set_ylabel("aggregate / token layer variance")
    ax.legend(fontsize=6)
    return save_figure(fig, path, title)


def layer_std_figure(
    dists_layer_std: pa.Table, path: str | PathLike[str], title: str | None = None
) -> list[Path]:
    """Mean layer_std (± sem over live latents) of each MLSAE against expansion factor (a line
    per k) and against k (a line per expansion factor)."""
    rows = [r for r in dists_layer_std.to_pylist() if r["n_layers"] > 1]
    if not rows:
        raise ValueError("no multi-layer dists_layer_std rows to plot")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]))
    for ax, (x_key, line_key, x_label) in zip(axes, (
        ("expansion_factor", "k", "expansion factor"), ("k", "expansion_factor", "k")
    ), strict=True):  # fmt: skip
        for group in sorted({(r["model"], r[line_key], r["tuned_lens"]) for r in rows}):
            pts = sorted(
                (r[x_key], r["mean"], r["sem"])
                for r in rows
                if (r["model"], r[line_key], r["tuned_lens"]) == group
            )
            xs, ys, es = zip(*pts, strict=True)
            label = f"{group[0]} {line_key.replace('_', ' ')} {group[1]}" + (
                " lens" if group[2] else ""
            )
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x_key] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel("layer_std (mean ± sem)")
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
