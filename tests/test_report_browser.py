"""The claims report in a real browser (Debian's chromium via Playwright, as the explorer's
test): report.html, built from planted cross-config tables, opens from a file:// URL with no
request leaving the file, shows the three claims with their verdicts, and every figure
(base64 PNG) decodes. Saves test-artifacts/report.png."""

from __future__ import annotations

from pathlib import Path

from tests.test_analysis import claim_inputs
from tests.test_explorer_browser import ARTIFACTS, BROWSER_ARGS, CHROMIUM, pytestmark  # noqa: F401


def test_report_opens_offline_with_claims_and_figures(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from mlsae_core.report import write_report

    out = write_report(claim_inputs(), tmp_path / "report")
    html = out["paths"]["html"]
    assert (tmp_path / "report" / "report.md").read_text().count("## Claim") == 3
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith("file:") or
                    r.url.startswith("data:") else outside.append(r.url))  # fmt: skip
            page.goto(html.as_uri())
            heads = page.locator("h2")
            for n in (1, 2, 3):
                expect(heads.nth(n - 1)).to_contain_text(f"Claim {n}:")
            expect(page.locator("body")).to_contain_text("Verdict: cannot tell")  # claim 1
            expect(page.locator("body")).to_contain_text("Verdict: holds")  # claim 3
            imgs = page.locator("figure img")
            expect(imgs).to_have_count(3)  # one per claim (no resid_cos_sim table here)
            for alt in ("claim1_fvu_by_layer", "claim2_variance_ratio", "claim3_layer_std"):
                img = page.locator(f'img[alt="{alt}"]')
                img.scroll_into_view_if_needed()
                assert img.evaluate("e => e.complete && e.naturalWidth > 100"), alt
            assert not outside, outside
            # "how it is computed" leads to the method's section inside the page itself
            page.get_by_role("link", name="how it is computed").first.click()
            assert page.url.endswith("#method-8-claims")
            section = page.locator("#method-8-claims")
            expect(section).to_contain_text("MLSAE vs single-layer SAEs")
            expect(section).to_be_in_viewport()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
