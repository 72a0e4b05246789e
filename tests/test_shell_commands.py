"""The README's Dagster commands, verbatim, in the shell `source .venv/bin/activate` sets up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACTIVATE = ROOT / ".venv" / "bin" / "activate"


def _shell(command: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    # A login-like shell: only what activate sets up (no DAGSTER_MODULE_NAME from outside).
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_MODULE")}
    return subprocess.run(
        ["bash", "-c", f"source {ACTIVATE} && {command}"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.skipif(not ACTIVATE.exists(), reason="needs the virtualenv of scripts/setup.sh")
def test_readme_dagster_commands_work_verbatim(tmp_path):
    env = {
        "MLSAE_SWEEP": "smoke",
        "MLSAE_DATA_DIR": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    activated = _shell('echo "$DAGSTER_HOME|${DAGSTER_MODULE_NAME:-unset}"', env)
    assert activated.stdout.strip() == f"{env['DAGSTER_HOME']}|unset", activated.stderr
    assert _shell("mlsae prepare --smoke", env).returncode == 0
    sweep = _shell("mlsae sweep", env, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    lines = [ln for ln in sweep.stdout.splitlines() if ln.strip()]
    assert len(lines) <= 12, sweep.stdout  # one line per run, plus a header and a footer
    for command in (
        "dagster asset materialize --select mmcs",
        "dagster asset materialize --select mlsae --partition 'tiny-llama|x2-k4-Lall'",
    ):
        out = _shell(command, env)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        assert "RUN_SUCCESS" in out.stderr + out.stdout, command
