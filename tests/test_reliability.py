"""Failures a user can meet: one writer per output, outputs that move together, validation
before compute, and one-line messages (interrupts, full disks, divergence, other models)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlsae_core import train as train_mod
from mlsae_core.cli import main
from mlsae_core.config import ConfigError, SAEConfig, TrainConfig
from mlsae_core.lock import output_lock
from mlsae_core.train import HISTORY_NAME, TrainingDiverged, read_history, train
from tests.test_cli import corpus_dir, tiny_model_dir, train_args  # noqa: F401 - fixtures
from tests.test_train import PlantedActivations, masks_for
from tests.tiny import write_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, src: PlantedActivations, lr: float = 3e-3, steps: int | None = None):
    return train(
        src,
        masks_for(src),
        SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=40),
        TrainConfig(lr=lr, accumulate_grad_batches=2, checkpoint_every=2, device="cpu"),
        out,
        batch_size=2,
        max_tokens=2 * 8 * 2 * 12,  # 12 steps
        progress=False,
        stop_after_steps=steps,
    )


# ----- one writer per output directory -----------------------------------------------------
def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds the lock of `out` until killed."""
    code = (
        "import time\nfrom mlsae_core.lock import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_writer_is_refused_naming_the_first(tiny_model_dir, corpus_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        assert main(train_args(tiny_model_dir, corpus_dir, out)) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert f"is being written by pid {holder.pid}" in err, err
    assert len(err.splitlines()) == 1 and not (out / "config.json").exists()
    assert main(train_args(tiny_model_dir, corpus_dir, out)) == 0  # a dead holder: trains


def test_a_second_writer_is_refused_before_the_model_loads(corpus_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    with output_lock(out):  # the refusal comes first: not "no such model directory"
        assert main(train_args(tmp_path / "no" / "such" / "model", corpus_dir, out)) == 1
    assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err


@pytest.mark.slow
def test_two_concurrent_trainings_leave_one_result_and_one_refusal(
    tiny_model_dir,  # noqa: F811
    corpus_dir,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_model_dir, corpus_dir, out) if a != "train"]
    slow = ["--max_tokens", "163840"]  # long enough that the second starts while the first runs
    cmd = [sys.executable, "-m", "mlsae_core.cli", "train", *args, *slow]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".mlsae.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    first_err = first.communicate(timeout=600)[1]
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    assert f"is being written by pid {first.pid}" in second.stderr
    assert (out / "config.json").exists()


# ----- training outputs move together -------------------------------------------------------
def test_kill_between_checkpoint_and_history_keeps_every_row(tmp_path, monkeypatch):
    src = PlantedActivations()
    _train(tmp_path / "ref", src)
    reference = read_history(tmp_path / "ref")

    real = train_mod._write_history
    calls = {"n": 0}

    def dies_after_the_state_commit(path: Path, rows):
        real(path, rows)
        if path.name == HISTORY_NAME and path.parent.name != train_mod.STATE_DIR:
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint's user-facing copy: "killed" here
                raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_write_history", dies_after_the_state_commit)
    victim = tmp_path / "victim"
    with pytest.raises(KeyboardInterrupt):
        _train(victim, src)
    monkeypatch.setattr(train_mod, "_write_history", real)
    _train(victim, src)  # resume
    got = read_history(victim)
    assert [r["step"] for r in got] == list(range(12))
    keep = ("step", "tokens", "loss", "fvu", "auxk_loss", "dead_fraction", "l0")
    assert [{k: r[k] for k in keep} for r in got] == [{k: r[k] for k in keep} for r in reference]


# ----- validation before compute ---------------------------------------------------------------
def test_bad_k_in_the_third_config_fails_before_the_first_trains(tmp_path):
    import dagster as dg
    import yaml

    from mlsae_pipeline.commands import run_sweep
    from mlsae_pipeline.sweep import SWEEPS_DIR

    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw["grid"].update(k=[4, 8, 100], layers=["all"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    instance = dg.DagsterInstance.ephemeral()
    data = write_smoke_inputs(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"config tiny-llama\|x2-k100-Lall: k=100 is not allowed"):
        run_sweep(str(path), data, instance=instance, report=lambda s: None)
    assert not instance.get_runs() and not (data / "saes").exists()


def test_a_sweep_with_a_missing_dataset_path_fails_before_compute(tmp_path):
    import dagster as dg
    import yaml

    from mlsae_pipeline.commands import run_sweep
    from mlsae_pipeline.sweep import SWEEPS_DIR

    raw = yaml.safe_load((SWEEPS_DIR / "smoke.yaml").read_text())
    raw["data"]["dataset"] = str(tmp_path / "no" / "such" / "corpus")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(ConfigError, match=r"data.dataset=.*no such file or directory"):
        run_sweep(str(path), tmp_path / "data", instance=instance, report=lambda s: None)
    assert not instance.get_runs()


def test_missing_model_path_is_named(corpus_dir, tmp_path, capsys):  # noqa: F811
    assert main(train_args(tmp_path / "no" / "such" / "model", corpus_dir, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "no such model directory" in err and "Repo id" not in err, err


# ----- one-line failures ---------------------------------------------------------------------
def test_nan_activations_are_named_not_blamed_on_the_learning_rate(tmp_path):
    src = PlantedActivations()
    _train(tmp_path, src, steps=2)
    src.acts[:, :, 3] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"activations are NaN/Inf") as err:
        _train(tmp_path, src)
    assert "learning rate" not in str(err.value)


def test_divergence_from_the_learning_rate_says_so(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"learning rate too high \(lr=1e\+30\)"):
        _train(tmp_path, PlantedActivations(), lr=1e30)


def test_an_encoder_decoder_model_gets_one_short_line(tmp_path, corpus_dir, capsys):  # noqa: F811
    from transformers import T5Config, T5ForConditionalGeneration

    from tests.tiny import tiny_tokenizer

    cfg = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tiny_tokenizer().save_pretrained(tmp_path / "t5")
    assert main(train_args(tmp_path / "t5", corpus_dir, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a decoder-only causal LM" in err and "T5Config" in err, err
    assert len(err) < 400 and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_the_rerun_resumes(tiny_model_dir, corpus_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_model_dir, corpus_dir, out) if a != "train"]
    # a budget long enough that the run is still going when it is interrupted, even idle
    cmd = [sys.executable, "-m", "mlsae_core.cli", "train", *args, "--max_tokens", "163840"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe: the child never blocks on its output
        # A shell's background jobs start with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler; a terminal's Ctrl-C reaches a foreground process with the
        # default disposition, which is what the child gets here.
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stderr=stderr,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        state = out / "training_state" / "state.json"
        deadline = time.monotonic() + 120
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted (run the same command again to resume)" in err
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and (out / "config.json").exists(), done.stderr[-2000:]
    assert "resuming" in done.stderr


@pytest.mark.slow
def test_full_disk_fails_in_one_line_and_resumes_after_space_is_freed(
    tiny_model_dir,  # noqa: F811
    corpus_dir,  # noqa: F811
    tmp_path,
):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # leave almost nothing free
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        out = mnt / "run"
        cmd = [sys.executable, "-m", "mlsae_core.cli", *train_args(tiny_model_dir, corpus_dir, out)]
        full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert full.returncode == 1, full.stderr[-2000:]
        last = full.stderr.strip().splitlines()[-1]
        assert "no space left on the device; free some space" in last, full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        filler.unlink()
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert (out / "config.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def test_lock_released_by_a_dead_process_is_taken(tmp_path):
    """A lock left by a killed run is stale by construction (flock dies with its process)."""
    out = tmp_path / "run"
    holder = _hold_lock(out)
    holder.kill()
    holder.wait()
    with output_lock(out):
        assert (out / ".mlsae.lock").exists()


# ----- extending a run -------------------------------------------------------------------------
def test_a_larger_budget_extends_a_finished_run_to_one_longer_run(
    tiny_model_dir,  # noqa: F811
    corpus_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    from mlsae_core.sae import MLSAE

    def budget(out: Path, tokens: int) -> list[str]:
        args = train_args(tiny_model_dir, corpus_dir, out)
        i = args.index("--max_tokens")
        return [*args[: i + 1], str(tokens), *args[i + 2 :]]

    assert main(budget(tmp_path / "short", 512)) == 0  # 4 steps, finished
    assert main(budget(tmp_path / "short", 1024)) == 0  # extended to 8 steps
    assert main(budget(tmp_path / "long", 1024)) == 0  # one run of 8 steps
    a, b = MLSAE.from_pretrained(tmp_path / "short"), MLSAE.from_pretrained(tmp_path / "long")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert a.metadata["max_tokens"] == 1024
    keep = ("step", "tokens", "loss", "fvu", "dead_fraction", "l0")
    ha, hb = read_history(tmp_path / "short"), read_history(tmp_path / "long")
    assert [{k: r[k] for k in keep} for r in ha] == [{k: r[k] for k in keep} for r in hb]
    assert len(ha) == 8
    capsys.readouterr()
    # anything else, or a smaller budget, is refused naming the fields that differ
    assert main(budget(tmp_path / "short", 512)) == 2
    assert "max_tokens: 1024 -> 512" in capsys.readouterr().err
    assert main([*budget(tmp_path / "short", 2048), "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.003 -> 0.001" in err and "max_tokens: 1024 -> 2048" in err, err


@pytest.mark.slow
def test_a_sweep_killed_mid_run_is_marked_failed_by_the_next(tmp_path):
    import dagster as dg

    from mlsae_pipeline.run_health import fail_dead_runs

    home, data = tmp_path / "dagster_home", write_smoke_inputs(tmp_path / "data")
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "MLSAE_SWEEP": "smoke"}
    env["MLSAE_DATA_DIR"] = str(data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlsae_core.cli", "sweep"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    instance = dg.DagsterInstance.from_config(str(home))
    started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
    deadline = time.monotonic() + 180
    while not instance.get_runs(filters=started) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    runs = instance.get_runs(filters=started)
    assert runs, "no run was in progress when the sweep was killed"
    assert fail_dead_runs(instance, report=lambda s: None) == [r.run_id for r in runs]
    status = instance.get_run_by_id(runs[0].run_id).status
    assert status == dg.DagsterRunStatus.FAILURE

    # A run launched by `dagster` itself (as the UI's daemon does) and killed: the sensor
    # dead_run_monitor finds its process through the RUN_START event's pid.
    from mlsae_pipeline.run_health import dead_run_monitor

    cmd = ["dagster", "asset", "materialize", "-m", "mlsae_pipeline.definitions", "--select",
           "transformer,corpus", "--partition", "tiny-llama"]  # fmt: skip
    exe = Path(sys.executable).with_name("dagster")
    proc = subprocess.Popen(
        [str(exe), *cmd[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not instance.get_runs(filters=started) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    runs = instance.get_runs(filters=started)
    if not runs:
        pytest.skip("the materialization finished before it could be killed")
    result = dead_run_monitor(dg.build_sensor_context(instance=instance))
    assert "marked 1 dead run(s) failed" in str(result.skip_message)
    assert instance.get_run_by_id(runs[0].run_id).status == dg.DagsterRunStatus.FAILURE


@pytest.mark.parametrize("name", train_mod.STATE_FILES)
def test_a_corrupt_resume_state_is_refused_naming_the_file(tmp_path, name):
    from mlsae_core import atomic
    from mlsae_core.checkpoint import CheckpointError

    src = PlantedActivations()
    _train(tmp_path, src, steps=2)  # a resume state at step 2
    state = tmp_path / train_mod.STATE_DIR
    assert set(atomic.read_manifest(state)) == set(train_mod.STATE_FILES)  # the one record
    assert "sha256" not in json.loads((state / "state.json").read_text())
    data = bytearray((state / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle of the file
    (state / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"training_state/{name} does not match"):
        _train(tmp_path, src)


def test_a_resume_state_without_its_manifest_is_refused(tmp_path):
    from mlsae_core import atomic
    from mlsae_core.checkpoint import CheckpointError

    src = PlantedActivations()
    _train(tmp_path, src, steps=2)
    (tmp_path / train_mod.STATE_DIR / atomic.MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"delete .*training_state to restart the run"):
        _train(tmp_path, src)


def test_the_lock_is_taken_once_per_run(tmp_path):
    """Not re-entrant: a training into a directory this very process holds is refused."""
    from mlsae_core.lock import OutputLocked

    with output_lock(tmp_path), pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        _train(tmp_path, PlantedActivations())
