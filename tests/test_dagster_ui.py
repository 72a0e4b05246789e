"""The Dagster UI in a real browser, started the way the README says (section "The Dagster UI").

In the project root, in the shell that `source .venv/bin/activate` sets up (DAGSTER_HOME and
MLSAE_DATA_DIR temporary directories, MLSAE_SWEEP=smoke): `mlsae sweep` materializes the smoke
sweep, then `dagster dev -p PORT` serves the UI (webserver + daemon). Debian's chromium, driven
by Playwright (no browser download), then does what a user does:

1. the asset graph shows every group: models, training, evaluation, figures, summary;
2. the `mmcs` asset shows its column schema and row count (as in tables/mmcs.parquet);
3. the `dists_heatmap` asset, partition tiny-llama|x2-k4-Lall, shows its figure inline;
4. "Materialize all" on the models group (transformer, corpus, ...) for partition tiny-llama
   launches a run, and the Runs page shows it succeed.

Screenshots and the logs of both commands go to test-artifacts/dagster-ui/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "dagster-ui"
ACTIVATE = Path(sys.prefix) / "bin" / "activate"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
GROUPS = ("models", "training", "evaluation", "figures", "summary")
FIGURE_PARTITION = "tiny-llama|x2-k4-Lall"
UI_PARTITION = "tiny-llama"
SWEEP_TIMEOUT_S = 240
SERVE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 150
SERVER_ERRORS: list[str] = []  # responses >= 500 seen by the browser

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),  # in CI: must run
        reason="/usr/bin/chromium is absent: apt-get install -y chromium (.ci/run does this)",
    ),
]

READY_QUERY = """{
  workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shell(command: str) -> list[str]:
    """`command` typed into the shell that `source .venv/bin/activate` sets up (its shell
    functions included)."""
    if ACTIVATE.exists():
        return ["bash", "-c", f'source "{ACTIVATE}" && {command}']
    return ["bash", "-c", f'export PATH="{Path(sys.executable).parent}:$PATH" && {command}']


def _graphql(base: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["data"]


def _not_ready(base: str) -> str | None:
    """None once the code location is loaded and every required daemon is healthy."""
    try:
        data = _graphql(base, READY_QUERY)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no answer ({exc})"
    entries = data["workspaceOrError"]["locationEntries"]
    loc = next((e for e in entries if e["name"] == "mlsae"), None)
    if loc is None or loc["loadStatus"] != "LOADED":
        return f"code location not loaded: {entries}"
    if loc["locationOrLoadError"]["__typename"] != "RepositoryLocation":
        pytest.fail(f"code location failed to load: {loc['locationOrLoadError']}")
    sick = [
        d["daemonType"]
        for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]
        if d["required"] and not d["healthy"]
    ]
    return f"daemons not healthy yet: {sick}" if sick else None


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`mlsae sweep`, then `dagster dev -p PORT` in the project root; yields its address."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        if old.is_file():
            old.unlink()
    base_dir = tmp_path_factory.mktemp("dagster-ui")
    home, data = base_dir / "dagster_home", base_dir / "data"
    home.mkdir()
    # A fresh shell: nothing of the caller's Dagster settings leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env |= {"DAGSTER_HOME": str(home), "MLSAE_SWEEP": "smoke", "MLSAE_DATA_DIR": str(data)}

    t0 = time.monotonic()
    subprocess.run(_shell("mlsae prepare --smoke"), cwd=ROOT, env=env, check=True)
    sweep_log = ARTIFACTS / "mlsae-sweep.log"
    with sweep_log.open("w") as log:
        sweep = subprocess.run(
            _shell("mlsae sweep"),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=SWEEP_TIMEOUT_S,
        )
    assert sweep.returncode == 0, f"mlsae sweep failed:\n{_tail(sweep_log)}"
    sweep_s = time.monotonic() - t0

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    dev_log = ARTIFACTS / "dagster-dev.log"
    log = dev_log.open("w")
    proc = subprocess.Popen(
        _shell(f"dagster dev -p {port}"),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: webserver, daemon, code servers, runs
    )
    try:
        t1 = time.monotonic()
        deadline = t1 + SERVE_TIMEOUT_S
        while (why := _not_ready(base)) is not None:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{_tail(dev_log)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"dagster dev not ready in {SERVE_TIMEOUT_S} s: {why}\n{_tail(dev_log)}"
                )
            time.sleep(1)
        print(f"\nmlsae sweep {sweep_s:.0f} s; dagster dev ready in {time.monotonic() - t1:.0f} s")
        yield {"base": base, "data": data, "home": home, "log": dev_log}
    finally:
        # Ctrl-C (SIGINT to the foreground process group, as a terminal sends it): dagster dev
        # stops its webserver, daemon and code servers in a few seconds; whatever is left of
        # the group after that is killed.
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def page(ui, tmp_path_factory):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=BROWSER_ARGS,
            viewport=VIEWPORT,
        )
        try:
            pg = context.new_page()
            pg.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            pg.on(
                "response",
                lambda r: SERVER_ERRORS.append(f"{r.status} {r.url}") if r.status >= 500 else None,
            )
            # First visit: Dagster asks to join its community; a user clicks Skip (remembered).
            community = pg.get_by_role("dialog").filter(has_text="Join the Dagster community")
            pg.goto(ui["base"] + "/asset-groups")
            try:
                community.wait_for(timeout=15_000)
            except PlaywrightError:
                pass  # not shown: nothing to dismiss
            else:
                community.get_by_role("button", name="Skip").click()
                expect(community).to_be_hidden()
            # Should it come back, it is dismissed the same way before the next action.
            pg.add_locator_handler(
                community, lambda d: d.get_by_role("button", name="Skip").click()
            )
            yield pg
        finally:
            expect.set_options(timeout=5_000)  # Playwright's default, for other modules
            context.close()


def _shot(pg, name: str, **kw) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), **kw)


@pytest.fixture
def step(page, request):
    """The page; a screenshot is saved if the test fails; no server error may occur."""
    failed_before = request.session.testsfailed
    del SERVER_ERRORS[:]
    yield page
    if request.session.testsfailed > failed_before:
        _shot(page, f"failed-{request.node.name}")
    assert not SERVER_ERRORS, SERVER_ERRORS


def test_asset_graph_shows_every_group(ui, step) -> None:
    from playwright.sync_api import expect

    step.goto(ui["base"] + "/asset-groups")
    expect(step.get_by_text("Global asset lineage")).to_be_visible()
    graph = step.locator("svg")
    for group in GROUPS:
        expect(graph.get_by_text(group, exact=True)).to_be_visible()
    _shot(step, "01-asset-graph")


def test_mmcs_shows_table_schema_and_row_count(ui, step) -> None:
    import pyarrow.parquet as pq
    from playwright.sync_api import expect

    table = pq.read_table(ui["data"] / "tables" / "mmcs.parquet")
    assert table.num_rows > 0
    step.goto(ui["base"] + "/assets/mmcs")
    row_count = step.get_by_text("Row count", exact=True).locator("xpath=..")
    expect(row_count).to_have_text(re.compile(rf"^\s*Row count\s*{table.num_rows}\s*$"))
    columns = step.locator("table").filter(
        has=step.get_by_role("cell", name="Column name", exact=True)
    )
    expect(columns).to_be_visible()
    for field in table.schema:  # every column with its Arrow type (string, int32, double, ...)
        row = columns.get_by_role("row").filter(
            has=step.get_by_role("cell", name=field.name, exact=True)
        )
        expect(row).to_contain_text(str(field.type))
    step.set_viewport_size({"width": 1400, "height": 1300})  # the whole column table
    try:
        expect(columns.get_by_role("cell", name=table.column_names[-1], exact=True)).to_be_visible()
        _shot(step, "02-mmcs-columns")
    finally:
        step.set_viewport_size(VIEWPORT)


def test_dists_heatmap_shows_its_figure(ui, step) -> None:
    from playwright.sync_api import expect

    model, sae = FIGURE_PARTITION.split("|")
    step.goto(
        ui["base"] + f"/assets/dists_heatmap?view=partitions&partition={quote(FIGURE_PARTITION)}"
    )
    expect(
        step.get_by_text(FIGURE_PARTITION, exact=True).filter(visible=True).first
    ).to_be_visible()
    expect(step.get_by_text("Materialized", exact=True).filter(visible=True).first).to_be_visible()
    # The figure's file, in this partition's directory, is listed in its metadata.
    expect(step.get_by_text(re.compile(rf"{model}/{sae}/dists_heatmap\.png")).first).to_be_visible()
    step.get_by_text("Show Markdown").first.click()
    heatmap = step.get_by_role("img", name=re.compile(r"^dists[ _]heatmap$"))
    dialog = step.get_by_role("dialog").filter(has=heatmap)
    image = dialog.get_by_role("img", name=re.compile(r"^dists[ _]heatmap$"))
    expect(image).to_be_visible()
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 300 and height > 200, (width, height)  # a decoded PNG, not a broken icon
    _shot(step, "03-dists-heatmap")
    step.keyboard.press("Escape")


def test_materialize_a_partition_from_the_ui(ui, step) -> None:
    from playwright.sync_api import expect

    nodes = _graphql(ui["base"], "{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
    models = {"/".join(n["assetKey"]["path"]) for n in nodes if n["groupName"] == "models"}
    assert "transformer" in models and "corpus" in models, models
    step.goto(ui["base"] + "/locations/mlsae/asset-groups/models")
    for asset in ("transformer", "corpus"):  # the graph's first nodes (the rest may be off-screen)
        expect(step.get_by_text(asset, exact=True).filter(visible=True).first).to_be_visible()
    step.get_by_role("button", name="Materialize all").click()
    dialog = step.get_by_role("dialog").filter(has_text="Launch runs to materialize")
    expect(dialog).to_contain_text(f"{len(models)} assets")
    expect(dialog.get_by_text("Loading pipeline and partition sets")).to_have_count(0)
    dialog.get_by_text("Select a partition or create one").click()
    step.get_by_text(UI_PARTITION, exact=True).filter(visible=True).click()
    dialog.get_by_text("Launch runs to materialize").click()  # close the partition list
    expect(step.get_by_placeholder("Filter partitions")).to_be_hidden()
    expect(dialog).to_contain_text("1 partition")
    launch = dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    _shot(step, "04-launch-dialog")
    launch.click()

    toast = step.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    run_id = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text()).group(1)
    t0 = time.monotonic()
    step.get_by_role("navigation").get_by_text("Runs", exact=True).click()
    # The runs list is a grid of divs: the run's row is the link's nearest ancestor that also
    # holds its "Launched by" cell.
    link = step.locator(f'a[href^="/runs/{run_id}"]', has_text=run_id)  # not the toast's
    row = link.locator("xpath=ancestor::div[contains(., 'Manually launched')][1]")
    expect(row).to_contain_text(UI_PARTITION)
    expect(row).to_contain_text(
        re.compile("Success|Failure|Canceled"), timeout=RUN_TIMEOUT_S * 1000
    )
    status = row.inner_text()
    assert "Success" in status, f"run {run_id} did not succeed:\n{status}\n{_tail(ui['log'])}"
    print(f"\nrun {run_id} succeeded {time.monotonic() - t0:.0f} s after launch")
    _shot(step, "05-runs")

    # What the run did, asked of the same webserver.
    runs = _graphql(
        ui["base"],
        "{ runsOrError(limit: 1) { ... on Runs { results { runId status "
        "tags { key value } assetSelection { path } } } } }",
    )["runsOrError"]["results"]
    (run,) = runs
    assert run["runId"].startswith(run_id) and run["status"] == "SUCCESS"
    assert {"/".join(a["path"]) for a in run["assetSelection"]} == models
    assert {"key": "dagster/partition", "value": UI_PARTITION} in run["tags"]
