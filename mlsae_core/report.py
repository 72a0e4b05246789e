"""The report: the paper's three claims at this sweep's budget, as one self-contained HTML page
(figures embedded as base64 PNG, so it opens offline) and the same content as Markdown.

The numbers and verdicts come from `analysis.claims` (the `claims` table); the figures from
`figures`. `mlsae report` and the pipeline's `report` asset both call `write_report`.
"""

from __future__ import annotations

import glob
import html
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mlsae_core import atomic, figures
from mlsae_core.analysis import claims, summaries
from mlsae_core.layout import RunLayout, StorageLayout
from mlsae_core.textable import format_table, format_value, png_data_uri

logger = logging.getLogger(__name__)

METHOD = Path(__file__).resolve().parents[1] / "docs" / "method.md"
# the sections of docs/method.md the claims cite, copied into the page so it stands alone
METHOD_SECTIONS = {"5-analyses": "## §5 Analyses", "8-claims": "## §8 Claims"}
# per-run tables the report reads (dists_summary becomes dists_layer_std)
RUN_INPUTS = ("test_metrics", "dists_summary", "layer_variance", "latent_variance")
SHOWN = ("statistic", "expansion_factor", "k", "layers", "layer", "value", "stderr", "baseline",
         "baseline_spread", "n_seeds")  # fmt: skip


def load_runs(runs: Sequence[RunLayout], resid: Sequence[Path] = ()) -> dict[str, pa.Table]:
    """The report's input tables from analysed run directories (and resid_cos_sim files)."""
    tables: dict[str, pa.Table] = {}
    for name in RUN_INPUTS:
        missing = [r.directory for r in runs if not r.table(name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]} has no {name}.parquet: run `mlsae analyse --repo_id "
                f"{missing[0]}` first (or `mlsae sweep`)"
            )
        tables[name] = pa.concat_tables(atomic.read_parquet(r.table(name)) for r in runs)
    tables["dists_layer_std"] = summaries.dists_layer_std(tables.pop("dists_summary"))
    if resid:
        tables["resid_cos_sim"] = pa.concat_tables(atomic.read_parquet(p) for p in resid)
    return tables


def load_root(layout: StorageLayout) -> dict[str, pa.Table]:
    """The report's input tables from a storage root (every run with a checkpoint)."""
    runs = layout.runs()
    if not runs:
        raise FileNotFoundError(f"no trained runs under {layout.root / 'saes'}: run mlsae sweep")
    return load_runs(
        runs, sorted(Path(p) for p in glob.glob(layout.model_table_glob("resid_cos_sim")))
    )


def resid_cos_sim_of(table: pa.Table) -> Any:
    """The ResidCosSim a resid_cos_sim table was made from (what its figure needs)."""
    import torch

    from mlsae_core.analysis.geometry import ResidCosSim

    rows = sorted(table.to_pylist(), key=lambda r: r["layer"])
    cos = {s: torch.tensor([r[f"cos_{s}"] for r in rows[:-1]]) for s in ("mean", "std")}
    norm = {s: torch.tensor([r[f"norm_{s}"] for r in rows]) for s in ("mean", "std")}
    layers = [r["layer"] for r in rows]
    return ResidCosSim(layers, cos, norm, torch.empty(0), int(rows[0]["n_tokens"]))


def _figures(tables: dict[str, pa.Table], out: Path) -> dict[str, list[Path]]:
    """Figure name -> its PNGs (a figure without data is left out, logged)."""
    made: dict[str, list[Path]] = {}
    jobs: list[tuple[str, Callable[[], list[Path]]]] = [
        ("claim1", lambda: figures.fvu_by_layer_figure(tables["test_metrics"], out / "claim1_fvu_by_layer")),
        ("claim2", lambda: figures.variance_ratio_figure(tables["layer_variance"], out / "claim2_variance_ratio")),
        ("claim3", lambda: figures.layer_std_figure(tables["dists_layer_std"], out / "claim3_layer_std")),
    ]  # fmt: skip
    resid = tables.get("resid_cos_sim")
    for model in sorted(set(resid["model"].to_pylist())) if resid is not None else []:
        sub = resid.filter(pc.equal(resid["model"], model))
        jobs.append(("resid", lambda sub=sub, m=model: figures.resid_cos_sim_figure(
            resid_cos_sim_of(sub), out / f"resid_cos_sim_{m}", title=m)))  # fmt: skip
    for name, draw in jobs:
        try:
            made.setdefault(name, []).extend(p for p in draw() if p.suffix == ".png")
        except ValueError as exc:
            logger.warning("report figure %s skipped: %s", name, exc)
    return made


def method_section(anchor: str, method: Path = METHOD) -> str:
    """The text of one cited section of docs/method.md (heading to the next `## `)."""
    heading = METHOD_SECTIONS[anchor]
    try:
        text = method.read_text(encoding="utf-8")
    except OSError:
        return f"docs/method.md of the mlsae project, {heading.removeprefix('## ')}."
    start = text.find(heading + "\n")
    if start < 0:
        raise ValueError(f"{method} has no section {heading!r}: update report.METHOD_SECTIONS")
    end = text.find("\n## ", start + len(heading))
    return text[start + len(heading) : end if end >= 0 else len(text)].strip()


def blocks(table: pa.Table, pngs: dict[str, list[Path]], n_runs: int) -> list[tuple[str, Any]]:
    """The report's content, once: (kind, payload) for both renderers."""
    out: list[tuple[str, Any]] = [
        ("h1", "MLSAE: the paper's claims at this sweep's budget"),
        (
            "p",
            f"{n_runs} run(s). Verdicts: holds / does not hold / cannot tell, with the reason; "
            "the rules are in the method's §8, at the end of this page.",
        ),  # fmt: skip
    ]
    verdict = claims.verdicts(table)
    summary = [[c, claims.CLAIMS[c][0], *verdict[c]] for c in sorted(verdict)]
    out.append(("table", (["claim", "statement", "verdict", "reason"], summary)))
    for c, (statement, statistic, anchor) in claims.CLAIMS.items():
        rows = [r for r in table.to_pylist() if r["claim"] == c and r["statistic"] != "none"]
        out += [
            ("h2", f"Claim {c}: {statement}"),
            ("p", f"Verdict: {verdict[c][0]} ({verdict[c][1]})."),
            ("link", (f"Statistic: {statistic}; how it is computed", f"#method-{anchor}")),
            ("table", (list(SHOWN), [[r[k] for k in SHOWN] for r in rows])),
        ]  # fmt: skip
        out += [("img", p) for p in pngs.get(f"claim{c}", [])]
    out.append(("h2", "Residual stream: cosine similarity of adjacent layers"))
    out.append(("p", "The paper's motivating figure: centred residuals at adjacent layers."))
    out += [("img", p) for p in pngs.get("resid", [])] or [
        ("p", "No resid_cos_sim table: run `mlsae figures resid_cos_sim` or `mlsae sweep`.")
    ]
    out.append(("h2", "Method (from docs/method.md)"))
    for anchor, heading in METHOD_SECTIONS.items():
        out.append(("section", (f"method-{anchor}", f"Method {heading.removeprefix('## ')}",
                                method_section(anchor))))  # fmt: skip
    return out


def to_markdown(content: list[tuple[str, Any]], image: Callable[[Path], str]) -> str:
    """Markdown of `blocks`; `image(png)` gives an image's Markdown (a link or a data URI)."""
    lines = []
    for kind, x in content:
        if kind in ("h1", "h2"):
            lines.append(f"{'#' * int(kind[1])} {x}")
        elif kind == "p":
            lines.append(x)
        elif kind == "link":
            lines.append(f"[{x[0]}]({x[1]})")
        elif kind == "section":  # its heading's anchor is x[0] on GitHub-style renderers
            lines.append(f"### {x[1]}\n\n{x[2].replace(chr(10) + '#', chr(10) + '###')}")
        elif kind == "table":
            lines.append(format_table(x[0], x[1], max_rows=len(x[1]), markdown=True))
        else:
            lines.append(image(x))
    return "\n\n".join(lines) + "\n"


def to_html(content: list[tuple[str, Any]]) -> str:
    """A self-contained HTML page of `blocks` (images inline)."""
    e = html.escape
    body = []
    for kind, x in content:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(x)}</{kind}>")
        elif kind == "link":
            body.append(f'<p><a href="{e(x[1])}">{e(x[0])}</a></p>')
        elif kind == "section":  # the method's Markdown as written (it reads well as text)
            body.append(f'<section id="{e(x[0])}"><h3>{e(x[1])}</h3><pre>{e(x[2])}</pre></section>')
        elif kind == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in x[0])
            rows = "".join(
                "<tr>" + "".join(f"<td>{e(format_value(v))}</td>" for v in r) + "</tr>"
                for r in x[1]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        else:
            body.append(f'<figure><img alt="{e(x.stem)}" src="{png_data_uri(x)}"></figure>')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:"
             "collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}pre{white-space:pre-wrap;font-size:13px}")  # fmt: skip
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>MLSAE report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(
    tables: dict[str, pa.Table], out_dir: str | Path, claims_table: pa.Table | None = None
) -> dict[str, Any]:
    """claims.parquet, report.html, report.md and the figures (PNG + PDF) into `out_dir`,
    each atomically and recorded in its manifest. Returns the claims table, the paths and the
    PNGs by figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if claims_table is None:
        claims_table = claims.claims_table(
            tables["test_metrics"], tables["dists_layer_std"], tables["layer_variance"],
            tables.get("latent_variance"),
        )  # fmt: skip
    pngs = _figures(tables, out)
    n_runs = tables["dists_layer_std"].num_rows  # one row per run
    content = blocks(claims_table, pngs, n_runs)
    paths = {"claims": out / "claims.parquet", "html": out / "report.html", "md": out / "report.md"}
    atomic.write_parquet(paths["claims"], claims_table)
    atomic.write_text(paths["html"], to_html(content))
    atomic.write_text(paths["md"], to_markdown(content, lambda p: f"![{p.stem}]({p.name})"))
    atomic.record(out, [paths["html"].name, paths["md"].name])
    return {"claims": claims_table, "paths": paths, "pngs": pngs, "blocks": content}


def print_claims(table: pa.Table) -> str:
    """The claims table and each claim's verdict, as `mlsae report` prints them."""
    rows = table.to_pylist()
    text = format_table(["claim", *SHOWN], [[r[c] for c in ("claim", *SHOWN)] for r in rows],
                        max_rows=len(rows))  # fmt: skip
    lines = [f"claim {c}: {v} ({why})" for c, (v, why) in sorted(claims.verdicts(table).items())]
    return "\n".join([text, *lines])
