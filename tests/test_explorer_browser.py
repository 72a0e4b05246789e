"""The explorer in a real browser: Debian's chromium driven by Playwright (no browser download).

Starts `mlsae explore` as a subprocess on a free loopback port over a tiny checkpoint with a
max_examples Parquet beside it, then: submit a prompt, see its tokens and the heatmap, click
a latent, see its examples, change the steering factor and see the logits change, reload and
keep the selection. Saves test-artifacts/explorer.png. Then, over a trained and analysed tiny
MLSAE, a latent's page shows each of its sections, and the prompt page links to latent pages
(test-artifacts/explorer-latent.png).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_explorer_api import PROMPT, build_checkpoint, free_port

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),  # in CI: must run
    reason="/usr/bin/chromium is absent: apt-get install -y chromium (.ci/run does this)",
)


@contextlib.contextmanager
def explore(ckpt: Path) -> Iterator[str]:
    """`mlsae explore` over `ckpt` in a subprocess on a free loopback port; yields its URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlsae_core.cli", "explore", "--repo_id", str(ckpt)]
    cmd += ["--port", str(port), "--max_prompt_tokens", "64"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"mlsae explore exited with {proc.returncode}:\n{out}")
            try:
                if httpx.get(f"{base}/api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlsae explore did not answer within 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with explore(build_checkpoint(tmp_path_factory.mktemp("explorer"), with_examples=True)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_explorer_in_browser(server, browser) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: None if r.url.startswith(server) else outside.append(r.url))
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 500 else None)
    page.set_default_timeout(20_000)

    # Submit a prompt: its tokens and the heatmap appear, the URL holds the prompt.
    page.goto(server + "/")
    expect(page.locator("#model-info")).to_contain_text("64 latents")
    page.fill("#prompt", PROMPT)
    page.click("#submit")
    n_tokens = len(PROMPT.split())
    expect(page.locator("#tokens .token")).to_have_count(n_tokens)
    expect(page.locator("#tokens .token").nth(1)).to_have_text("Mary")
    expect(page.locator("#tokens .token.selected")).to_have_text("to")  # last position
    assert "/prompt/When%20Mary" in page.url
    expect(page.locator("#heatmap rect.cell").first).to_be_visible()
    expect(page.locator("#metrics tr.mean")).to_contain_text("mean")
    expect(page.locator("#histograms .hist")).to_have_count(3)

    # Click the strongest latent at the selected token: its examples and token shading appear.
    hm = httpx.post(
        f"{server}/api/heatmap", json={"prompt": PROMPT, "position": n_tokens - 1}
    ).json()
    best = max(
        ((li, j) for li in range(len(hm["layers"])) for j in range(len(hm["latents"]))),
        key=lambda t: hm["values"][t[0]][t[1]],
    )
    latent, layer = hm["latents"][best[1]], hm["layers"][best[0]]
    page.click(f'#heatmap rect.cell[data-latent="{latent}"][data-layer="{layer}"]')
    expect(page.locator("#latent")).to_have_value(str(latent))
    expect(page.locator("#layer")).to_have_value(str(layer))
    expect(page.locator("#examples .example").first).to_be_visible()
    expect(page.locator("#examples .example .ctx.centre").first).not_to_be_empty()
    shaded = page.eval_on_selector_all(
        "#tokens .token", "els => els.filter(e => e.style.background !== 'transparent').length"
    )
    assert shaded >= 1
    assert f"latent={latent}" in page.url and f"layer={layer}" in page.url
    expect(page.locator("#logits-steer")).to_contain_text(f"latent {latent} × 2")

    # Change the steering factor: the steered logits change.
    before = page.inner_text("#logits-steer")
    page.fill("#factor", "-6")
    page.dispatch_event("#factor", "change")
    expect(page.locator("#logits-steer")).to_contain_text(f"latent {latent} × -6")
    after = page.inner_text("#logits-steer")
    assert after != before
    assert "factor=-6" in page.url

    # Click another token: logits move to that position; reload keeps the whole selection.
    page.locator("#tokens .token").nth(3).click()
    expect(page.locator("#logits-clean")).to_contain_text("(position 3)")
    page.reload()
    expect(page.locator("#tokens .token.selected")).to_have_text("John")
    expect(page.locator("#latent")).to_have_value(str(latent))
    expect(page.locator("#factor")).to_have_value("-6")
    expect(page.locator("#logits-steer")).to_contain_text(f"latent {latent} × -6")
    expect(page.locator("#examples .example").first).to_be_visible()

    # A bad prompt shows the API's message, not a broken page.
    page.fill("#prompt", "Mary " * 70)
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("tokens; the limit is 64")

    page.goto(f"{server}/prompt/{'When%20Mary%20and%20John%20went'}?latent={latent}&layer={layer}")
    expect(page.locator("#tokens .token")).to_have_count(5)
    expect(page.locator("#examples .example").first).to_be_visible()
    expect(page.locator("#heatmap rect.cell").first).to_be_visible()
    expect(page.locator("#logits-recons")).to_contain_text("largest increases")
    page.wait_for_function("document.body.dataset.pending === '0'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
    page.close()
    assert not failed, failed
    # the one expected error: the 422 of the over-long prompt
    assert [e for e in errors if "422" not in e] == [], errors
    assert not outside, f"the page fetched something other than the explorer: {outside}"


# ----- the latent pages ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(URL of `mlsae explore` over a trained and analysed tiny MLSAE, its most active latent)."""
    import pyarrow.parquet as pq

    from tests.test_explorer_latent import trained_run

    run = trained_run(tmp_path_factory.mktemp("latent"))
    dists = pq.read_table(run / "latent_dists.parquet").to_pylist()
    with explore(run) as base:
        yield base, max(dists, key=lambda r: r["count"])["latent"]


def test_latent_pages_in_browser(trained, browser) -> None:
    from playwright.sync_api import expect

    base, live = trained
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
    page.set_default_timeout(20_000)

    # Every section of a live latent's page.
    page.goto(f"{base}/latent/{live}")
    expect(page.locator("#latent-title")).to_have_text(f"Latent {live}")
    expect(page.locator("#latent-views")).to_be_visible()
    expect(page.locator("#dist-panel h2")).to_have_text("Distribution over layers")
    expect(page.locator("#dist-chart rect.bar")).to_have_count(3)
    expect(page.locator("#dist-stats")).to_contain_text("layer_mean")
    expect(page.locator("#dist-stats")).to_contain_text("layer_std")
    expect(page.locator("#density-chart rect.bar")).to_have_count(3)
    expect(page.locator("#density-note")).to_contain_text("tokens it fires on")
    expect(page.locator("#values-chart rect.bar")).to_have_count(20)  # latent.BINS
    expect(page.locator("#values-note")).to_contain_text("fired values over all layers")
    expect(page.locator("#effects .effect h3")).to_have_text("decoder direction (every layer)")
    expect(page.locator("#effects table.increases tr")).to_have_count(10)
    expect(page.locator("#effects table.decreases tr")).to_have_count(10)
    expect(page.locator("#max-examples .layer-examples")).to_have_count(3)
    expect(page.locator("#max-examples .example .ctx.centre").first).not_to_be_empty()
    expect(page.locator("#quantile-examples .quantile-examples")).to_have_count(5)
    expect(page.locator("#quantile-examples .example .ctx.centre").first).to_be_visible()
    expect(page.locator("#neighbours a.latent-link")).to_have_count(10)
    page.wait_for_function("document.body.dataset.pending === '0'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-latent.png"), full_page=True)

    # A neighbour's link opens its page; the search box opens one by id or says the range.
    other = page.locator("#neighbours a.latent-link").first.get_attribute("data-latent")
    page.locator("#neighbours a.latent-link").first.click()
    expect(page.locator("#latent-title")).to_have_text(f"Latent {other}")
    page.fill("#latent-id", "64")
    page.click("#latent-search button")
    expect(page.locator("#error")).to_contain_text("0..63")
    page.fill("#latent-id", "2")
    page.click("#latent-search button")
    expect(page.locator("#latent-title")).to_have_text("Latent 2")
    assert page.url == f"{base}/latent/2"
    page.goto(f"{base}/latent/64")
    expect(page.locator("#error")).to_have_text(
        "latent=64 is out of range: the MLSAE has 64 latents (0..63)"
    )

    # The prompt page links every latent of its heatmap to its page.
    page.goto(f"{base}/prompt/the%20quick%20brown%20fox%20jumps%20over%20the%20lazy%20dog")
    expect(page.locator("#heatmap rect.cell").first).to_be_visible()
    links = page.locator("#heatmap-links a.latent-link")
    shown = page.eval_on_selector_all(
        "#heatmap rect.cell", "els => new Set(els.map(e => e.dataset.latent)).size"
    )
    expect(links).to_have_count(shown)
    target = links.first.get_attribute("data-latent")
    links.first.click()
    expect(page.locator("#latent-title")).to_have_text(f"Latent {target}")
    assert page.url == f"{base}/latent/{target}"
    expect(page.locator("#dist-chart rect.bar")).to_have_count(3)
    page.close()
    assert [e for e in errors if "404" not in e] == [], errors
    assert not outside, f"the page fetched something other than the explorer: {outside}"
