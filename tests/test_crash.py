"""Crash safety: SIGKILL at random moments never loses or corrupts work."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mlsae_core.checkpoint import CheckpointError
from mlsae_core.sae import MLSAE

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, "-m", "tests.crash_worker"]


def _start(mode: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*WORKER, mode, str(out)], cwd=ROOT, env=env)


def _mtime(path) -> int:
    """0 while `path` is absent, including the instant between atomic_dir's two renames that
    replace the training state (the test polls while training writes)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_identical_weights(tmp_path):
    reference = tmp_path / "ref"
    assert subprocess.run([*WORKER, "train", str(reference)], cwd=ROOT).returncode == 0
    want = MLSAE.from_pretrained(reference)

    victim = tmp_path / "victim"
    state = victim / "training_state" / "state.json"
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        proc = _start("train", victim)
        seen = _mtime(state)
        deadline = time.monotonic() + 60
        # wait for the next checkpoint, then kill at a random moment after it
        while proc.poll() is None and time.monotonic() < deadline:
            if _mtime(state) not in (0, seen):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (victim / "config.json").exists():
            break
    assert kills >= 3
    final = subprocess.run([*WORKER, "train", str(victim)], cwd=ROOT)
    assert final.returncode == 0
    got = MLSAE.from_pretrained(victim)
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    leftovers = [p.name for p in victim.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


@pytest.mark.slow
def test_artefact_writes_are_atomic_under_sigkill(tmp_path):
    rng = random.Random(1)
    for _ in range(8):
        proc = _start("rewrite", tmp_path)
        time.sleep(rng.uniform(1.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (tmp_path / "t.parquet").exists():
            table = pq.read_table(tmp_path / "t.parquet")  # never half a file
            assert table.column("v").to_pylist() == list(range(table.num_rows))
        if (tmp_path / "ck" / "config.json").exists():
            # each file is whole; a kill before the manifest is written is detected, never used
            try:
                sae = MLSAE.from_pretrained(tmp_path / "ck")
                assert sae.encoder.weight.shape == (sae.n_latents, 8)
            except CheckpointError as exc:
                assert "does not match the sha256 in its manifest" in str(exc), exc


def test_kill_between_directory_renames_is_recovered(tmp_path):
    """atomic_dir swaps a directory with two renames; a kill between them loses nothing."""
    from mlsae_core import atomic

    target = tmp_path / "state"
    target.mkdir()
    (target / "a").write_text("old")
    # simulate the kill: the old copy moved aside, the new one never moved in
    os.replace(target, tmp_path / f".state.old-{os.getpid()}")
    (tmp_path / ".state.x1.tmp").mkdir()
    assert atomic.recover_dir(target)
    assert (target / "a").read_text() == "old"
    assert [p.name for p in atomic.remove_stale_temporaries(tmp_path)] == [".state.x1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
