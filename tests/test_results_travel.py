"""Results travel: a storage root moved or copied keeps answering (queries, explorer, sweeps),
a sweep file means exactly what it says, files follow the user's umask, and `--out` paths do
what they look like."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlsae_core.cli import main
from mlsae_core.config import ConfigError
from tests.tiny import write_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]
QUERIES = {
    "summary": "SELECT model, k, layers, round(fvu, 6) AS fvu FROM test_summary ORDER BY ALL",
    "views": "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1",
    "rows": "SELECT (SELECT count(*) FROM latent_dists), (SELECT count(*) FROM max_examples), "
    "(SELECT count(*) FROM training_history), (SELECT count(*) FROM mmcs)",
    "history": "SELECT count(DISTINCT filename) FROM training_history",
}


def _sweep(root: Path) -> list[dict]:
    """`mlsae sweep`'s own entry on the smoke sweep, with the Dagster record at its default
    place (inside the root): DAGSTER_HOME unset for the call, restored afterwards."""
    from mlsae_pipeline.commands import run_sweep

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DAGSTER_HOME", raising=False)
        mp.setenv("MLSAE_DATA_DIR", str(root))
        return run_sweep("smoke", root, report=lambda s: None)


def _answers(root: Path) -> dict[str, list]:
    from mlsae_core.query import run_query

    return {name: run_query(sql, root / "results.duckdb")[1] for name, sql in QUERIES.items()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("travel")
    root = write_smoke_inputs(base / "data")
    rows = _sweep(root)
    assert all(r["success"] for r in rows)
    return {"base": base, "root": root, "answers": _answers(root)}


def test_the_record_of_finished_work_lives_in_the_root(swept):
    assert (swept["root"] / "dagster" / "dagster.yaml").is_file()
    assert swept["answers"]["rows"][0][0] > 0 and len(swept["answers"]["summary"]) == 4


def _explorer_info(run_dir: Path) -> dict:
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import load_app

    with TestClient(load_app(str(run_dir))) as client:
        info = client.get("/api/info")
        assert info.status_code == 200, info.text
        prompt = client.post("/api/prompt", json={"prompt": "the cat sat"})
        assert prompt.status_code == 200, prompt.text
        examples = client.get("/api/examples", params={"latent": 0, "layer": 1})
        assert examples.status_code == 200, examples.text
        assert info.json()["examples"]["available"]
        return info.json()["sae"]


def test_a_moved_root_answers_everything_and_recomputes_nothing(swept, monkeypatch):
    old, moved = swept["root"], swept["base"] / "elsewhere" / "data"
    moved.parent.mkdir()
    os.rename(old, moved)
    try:
        assert _answers(moved) == swept["answers"]
        # the filename column names the files where they are now
        from mlsae_core.query import run_query

        (where,) = run_query(
            "SELECT min(filename) FROM training_history", moved / "results.duckdb"
        )[1]
        assert where[0].startswith(str(moved)), where
        monkeypatch.setenv("MLSAE_DATA_DIR", str(moved))
        assert main(["query", "SELECT count(*) AS n FROM test_summary"]) == 0
        assert _explorer_info(moved / "saes" / "tiny-llama" / "x2-k4-Lall")["n_latents"] > 0
        rows = _sweep(moved)
        assert all(r["success"] for r in rows)
        assert not any(r["launched"] for r in rows), [r["launched"] for r in rows]
    finally:
        os.rename(moved, old)


def test_a_copied_root_and_its_original_both_keep_working(swept):
    original, copy = swept["root"], swept["base"] / "colleague" / "data"
    shutil.copytree(original, copy, symlinks=True)
    for root in (copy, original):
        assert _answers(root) == swept["answers"]
        rows = _sweep(root)
        assert not any(r["launched"] for r in rows), (root, [r["launched"] for r in rows])
    assert _explorer_info(copy / "saes" / "tiny-llama" / "x2-k8-L1")["n_latents"] > 0
    # a file broken in the copy is rebuilt there and nowhere else
    (copy / "tables" / "mmcs.parquet").write_bytes(b"not parquet")
    rows = _sweep(copy)
    assert any("mmcs" in r["launched"] for r in rows)
    assert not any(r["launched"] for r in _sweep(original))


# ----- a sweep file is read strictly ------------------------------------------------------------
SMOKE = (ROOT / "data" / "sweeps" / "smoke.yaml").read_text()


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("name: a\nmodels: [tiny-llama]\nname: b\n", "name", (1, 3)),
        (
            "models: [tiny-llama]\ndata:\n  max_tokens: 64\n  max_length: 8\n  max_tokens: 128\n",
            "max_tokens",
            (3, 5),
        ),  # fmt: skip
        ("models: [tiny-llama]\ngrid:\n  k: [4]\n  k: [8]\n", "k", (3, 4)),
    ],
)
def test_a_key_written_twice_is_refused_with_both_lines(tmp_path, capsys, text, key, lines):
    from mlsae_pipeline.sweep import load_sweep

    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert f"key {key!r} is written twice (lines {lines[0]} and {lines[1]})" in message
    assert str(path) in message and "\n" not in message
    # through the CLI: refused before any compute (nothing is written under the root)
    root = tmp_path / "root"
    assert main(["sweep", "--sweep", str(path), "--data_dir", str(root)]) == 2
    assert "written twice" in capsys.readouterr().err
    assert not root.exists() or not any(root.iterdir())


def test_the_shipped_smoke_sweep_has_no_key_twice():
    from mlsae_pipeline.sweep import load_sweep

    assert load_sweep(ROOT / "data" / "sweeps" / "smoke.yaml").name == "smoke"


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("data:\n  max_tokens: '4096'", None, "data.max_tokens='4096' is not allowed: an integer"),
        ("train:\n  lr: fast", None, "train.lr='fast' is not allowed"),
        ("grid:\n  tuned_lens: [maybe]", None, "tuned_lens"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(tmp_path, section, value, message):
    from mlsae_pipeline.sweep import load_sweep

    path = tmp_path / "typed.yaml"
    path.write_text(f"models: [tiny-llama]\n{section}\n")
    with pytest.raises(ConfigError, match="is not allowed") as err:
        load_sweep(path)
    assert message in str(err.value)


# ----- files follow the umask ------------------------------------------------------------------
UMASK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    os.umask(int(sys.argv[2], 8))
    from tests.tiny import write_smoke_inputs
    from mlsae_pipeline.commands import run_sweep
    root = write_smoke_inputs(Path(sys.argv[1]))
    rows = run_sweep("smoke", root, report=lambda s: None)
    assert all(r["success"] for r in rows)
    """
)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_follows_the_umask(tmp_path, umask):
    root = tmp_path / "data"
    env = {**os.environ, "MLSAE_DATA_DIR": str(root), "PYTHONPATH": str(ROOT)}
    env.pop("DAGSTER_HOME", None)
    done = subprocess.run(
        [sys.executable, "-c", UMASK_SCRIPT, str(root), oct(umask)[2:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wrong = []
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.suffix == ".db":  # Dagster's SQLite record: SQLite creates its files 0644
            want = 0o644 & ~umask
        if mode != want:
            wrong.append(f"{oct(mode)} {path.relative_to(root)}")
    checked = {p.name for p in root.rglob("*")}
    assert {"model.safetensors", "config.json", "history.parquet", "manifest.json"} <= checked
    assert {"results.duckdb", "cache.json"} <= checked
    assert not wrong, f"umask {oct(umask)}: " + ", ".join(wrong[:20])


# ----- output paths do what they look like -----------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["test", "--repo_id", "RUN", "--out", "OUT"],
        ["analyse", "--repo_id", "RUN", "--out", "OUT"],
        ["figures", "mmcs", "--repo_id", "RUN", "--out", "OUT"],
    ],
)
@pytest.mark.parametrize("name", ["results.csv", "heatmap.png", "a_file"])
def test_an_out_that_is_or_looks_like_a_file_is_refused(tmp_path, capsys, argv, name):
    out = tmp_path / name
    if name == "a_file":
        out.write_text("keep me")
    argv = [str(tmp_path / "run") if a == "RUN" else str(out) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--out names a directory" in err and str(out) in err, err
    if name == "a_file":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


def test_an_out_directory_with_a_dot_in_its_name_is_a_directory(tmp_path):
    from mlsae_core.cli import out_dir

    assert out_dir("runs/pythia-1.4b") == Path("runs/pythia-1.4b")
    (tmp_path / "figures.png").mkdir()  # an existing directory is what it is
    assert out_dir(str(tmp_path / "figures.png")) == tmp_path / "figures.png"
