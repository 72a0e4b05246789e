"""Figure renderers: each writes a readable PNG and a PDF, atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mlsae_core import figures
from mlsae_core.analysis.dists import LayerDists
from mlsae_core.analysis.geometry import decoder_sim_vs_layer_distance, resid_cos_sim
from mlsae_core.analysis.prompts import PromptHeatmap


def check_written(paths: list[Path], stem: Path) -> None:
    """A PNG (paper-size pixels, not blank) and a PDF, no temporary files left behind."""
    import matplotlib.image as mpimg

    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert {p.with_suffix("") for p in paths} == {stem}
    png = next(p for p in paths if p.suffix == ".png")
    img = mpimg.imread(png)  # [H, W, 4] floats in [0, 1]
    h, w = img.shape[:2]
    assert 400 <= h <= 2000 and 600 <= w <= 3000, (h, w)
    assert img[..., :3].std() > 0.02  # something was drawn, not a constant image
    pdf = next(p for p in paths if p.suffix == ".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not list(stem.parent.glob(".*.tmp"))


@pytest.fixture(scope="module")
def dists():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 200, 40, generator=g) + torch.linspace(-1, 1, 6)[
        :, None, None
    ] * torch.randn(40, generator=g)
    v, i = torch.topk(z, 4, dim=-1)
    col = LayerDists(40, [0, 1, 2, 3, 4, 5])
    col.add(torch.relu(v), i)
    return col.result()


def test_dists_heatmap_and_histogram(tmp_path: Path, dists) -> None:
    stem = tmp_path / "dists_heatmap"
    check_written(figures.dists_heatmap(dists, stem, title="tiny x2 k4"), stem)
    stem = tmp_path / "layer_mean_hist"
    check_written(figures.layer_mean_histogram(dists, stem.with_suffix(".png"), bins=10), stem)


def test_prompt_heatmap_figure(tmp_path: Path, dists) -> None:
    order = dists.order()
    heat = PromptHeatmap(
        prompt="When Mary and John went to the store",
        layers=dists.layers,
        tokens=["When", "Mary"],
        latents=order,
        matrix=dists.p[:, order],
        layer_mean=dists.layer_mean[order],
        raw=dists.totals[:, order],
    )
    stem = tmp_path / "sub" / "prompt_heatmap"
    check_written(figures.prompt_heatmap_figure(heat, stem), stem)


def test_resid_cos_sim_figure(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 64, 8, generator=g)
    x = base + 0.5 * torch.randn(5, 64, 8, generator=g).cumsum(0)  # correlated layers
    res = resid_cos_sim([x])
    stem = tmp_path / "resid_cos_sim"
    check_written(figures.resid_cos_sim_figure(res, stem, title="tiny"), stem)


def test_decoder_sim_figure(tmp_path: Path, dists) -> None:
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(2))
    hist = decoder_sim_vs_layer_distance(w, dists.layer_mean, dists.n_layers, dist_bins=8)
    stem = tmp_path / "decoder_sim"
    check_written(figures.decoder_sim_figure(hist, stem), stem)


def summary_rows() -> list[dict]:
    rows = []
    for ef in (1, 2, 4):
        for k in (4, 8, 16):
            for layer in ("0", "avg"):
                rows.append(
                    {
                        "model": "tiny",
                        "expansion_factor": ef,
                        "k": k,
                        "layers": "0-2",
                        "layer": layer,
                        "fvu": 1.0 / (ef * k),
                        "mse": 0.1 / k,
                        "l0": float(k),
                        "dce": 0.5 / ef,
                        "kl": math.nan if ef == 4 else 0.1,
                    }
                )
    return rows


def test_summary_figures_from_rows_and_table(tmp_path: Path) -> None:
    rows = [r for r in summary_rows() if r["layer"] == "avg"]
    paths = figures.summary_figures(
        pa.Table.from_pylist(rows), tmp_path / "rows", metrics=("fvu", "kl")
    )
    stems = sorted({p.with_suffix("").name for p in paths})
    assert stems == [
        "test_fvu_by_expansion",
        "test_fvu_by_k",
        "test_kl_by_expansion",
        "test_kl_by_k",
    ]
    for stem in stems:
        check_written(
            [p for p in paths if p.with_suffix("").name == stem], tmp_path / "rows" / stem
        )
    table = pa.Table.from_pylist(rows)
    paths = figures.summary_figures(table, tmp_path / "table", metrics=("l0",))
    assert len(paths) == 4
    with pytest.raises(ValueError):
        figures.summary_figures(pa.table({}), tmp_path / "none")


def test_png_pixels_reflect_data(tmp_path: Path, dists) -> None:
    """Two different distributions give different heatmap images (the data is drawn)."""
    import matplotlib.image as mpimg

    a = figures.dists_heatmap(dists, tmp_path / "a")
    col = LayerDists(40, list(range(6)))
    v = torch.ones(6, 10, 1)
    i = torch.arange(40)[:10].repeat(6, 1)[..., None]
    col.add(v, i)
    b = figures.dists_heatmap(col.result(), tmp_path / "b")
    ia = mpimg.imread(next(p for p in a if p.suffix == ".png"))
    ib = mpimg.imread(next(p for p in b if p.suffix == ".png"))
    assert ia.shape == ib.shape and not np.allclose(ia, ib)
