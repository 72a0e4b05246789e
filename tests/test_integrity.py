"""Trust nothing read back: a corrupt or truncated file is caught before use, and derived data
(activation cache, token chunks, result tables) is rebuilt while user data (a checkpoint) is
refused with a message naming the file.

"Corrupt" means bytes overwritten in the MIDDLE of the file, where no parser notices; the
pipeline tests break the smoke sweep's files and run `mlsae sweep` again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from mlsae_core.cache import ActivationCache, CacheMismatchError
from mlsae_core.config import SAEConfig, TrainConfig
from mlsae_core.train import train
from tests.conftest import storage_env
from tests.tiny import tiny_transformer, write_smoke_inputs

MODEL = "tiny-llama"


def overwrite_middle(path: Path, n: int = 16) -> None:
    """Replace n bytes in the middle of `path` with their complement (size kept)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ----- activation cache ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tt():
    return tiny_transformer("llama", n_layers=3, d=32)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 101, (8, 16), generator=torch.Generator().manual_seed(0))


def _train_on(cache: ActivationCache, tokens: torch.Tensor, out: Path):
    return train(
        cache,
        torch.ones_like(tokens, dtype=torch.bool),
        SAEConfig(expansion_factor=4, k=4, auxk=8, dead_tokens_threshold=100),
        TrainConfig(lr=3e-3, accumulate_grad_batches=1, checkpoint_every=100, device="cpu"),
        out,
        batch_size=2,
        max_tokens=2 * 16 * 8,
        progress=False,
    )


def test_cache_shard_overwritten_in_the_middle_is_rebuilt(tt, tokens, tmp_path, caplog):
    ActivationCache.open_or_build(tmp_path / "c", tt, tokens, shard_rows=4, progress=False)
    shard = tmp_path / "c" / "shard_00000.npy"
    overwrite_middle(shard, n=256)
    with caplog.at_level(logging.INFO, logger="mlsae_core.cache"):
        cache = ActivationCache.open_or_build(tmp_path / "c", tt, tokens, progress=False)
    assert str(shard) in caplog.text  # the log names the corrupt shard
    fresh = ActivationCache.open_or_build(tmp_path / "f", tt, tokens, progress=False)
    a = _train_on(cache, tokens, tmp_path / "a")
    b = _train_on(fresh, tokens, tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_truncated_cache_shard_is_named_and_rebuilt(tt, tokens, tmp_path):
    ActivationCache.open_or_build(tmp_path / "c", tt, tokens, shard_rows=4, progress=False)
    shard = tmp_path / "c" / "shard_00001.npy"
    truncate(shard)
    with pytest.raises(CacheMismatchError, match="shard_00001.npy"):
        ActivationCache.open(tmp_path / "c")
    cache = ActivationCache.open_or_build(tmp_path / "c", tt, tokens, progress=False)
    rows = torch.arange(len(tokens))
    assert torch.equal(cache(rows), tt.activations(tokens).half().float())


# ----- result tables, token chunks, checkpoints --------------------------------------------
def test_result_table_with_overwritten_bytes_is_refused_naming_the_file(tmp_path):
    """The manifest's sha256 covers the whole file: data pages and the footer (schema,
    statistics); a table whose manifest entry is gone is refused too."""
    import pyarrow as pa

    from mlsae_core import atomic

    read_table = atomic.read_parquet
    table = pa.table({"layer": ["0", "1", "avg"], "fvu": [0.1, 0.2, 0.15]})
    path = tmp_path / "test_metrics.parquet"
    atomic.write_parquet(path, table)
    good = path.read_bytes()
    assert read_table(path).equals(table)
    for at in range(4, len(good) - 8, max(1, len(good) // 40)):  # every region of the file
        bad = bytearray(good)
        bad[at] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="test_metrics.parquet"):
            read_table(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="test_metrics.parquet"):
        read_table(path)
    path.write_bytes(good)
    atomic.record(tmp_path, [], forget=[path.name])
    with pytest.raises(ValueError, match=r"test_metrics.parquet is not recorded in"):
        read_table(path)


def test_token_chunks_with_overwritten_bytes_are_refused(tmp_path):
    from mlsae_core.chunks import TokenChunks
    from mlsae_core.documents import DataError

    chunks = TokenChunks(
        tokens=torch.arange(4 * 64).reshape(4, 64),
        doc_index=torch.zeros(4, 64, dtype=torch.int32),
        documents=[],
        special_ids=frozenset({0}),
    )
    path = tmp_path / "train.safetensors"
    chunks.save(path)
    good = path.read_bytes()
    overwrite_middle(path)
    with pytest.raises(DataError, match=r"train\.safetensors does not match the sha256"):
        TokenChunks.load(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"train\.safetensors does not match the sha256"):
        TokenChunks.load(path)


# ----- the pipeline heals, the CLI refuses -------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke sweep, materialized once; each test breaks files and sweeps again."""
    import dagster as dg

    from mlsae_core.layout import StorageLayout
    from mlsae_pipeline.commands import run_sweep

    base = tmp_path_factory.mktemp("integrity")
    data, home = base / "data", base / "dagster_home"
    home.mkdir()
    write_smoke_inputs(data)
    instance = dg.DagsterInstance.ephemeral()

    def sweep() -> list[dict]:
        return run_sweep("smoke", data, instance=instance, report=lambda s: None)

    with storage_env(data, home):
        assert all(r["success"] for r in sweep())
        yield {"layout": StorageLayout(data), "sweep": sweep}


def _recomputed(rows: list[dict]) -> set[str]:
    """Stages that materialized anything (not everything was skipped)."""
    return {r["stage"] for r in rows if r["launched"]}


def _heals(smoke, paths: list[Path], damage) -> list[dict]:
    """Damage `paths`, sweep: every stage succeeds and the files come back byte for byte; a
    second sweep re-uses everything."""
    good = {p: p.read_bytes() for p in paths}
    for p in paths:
        damage(p)
    rows = smoke["sweep"]()
    assert all(r["success"] for r in rows), [r["stage"] for r in rows if not r["success"]]
    for p, data in good.items():
        assert p.read_bytes() == data, f"{p} was not rebuilt"
    again = smoke["sweep"]()
    assert all(r["success"] for r in again) and not _recomputed(again), [
        r["launched"] for r in again
    ]
    return rows


@pytest.mark.parametrize("damage", [truncate, overwrite_middle], ids=["truncated", "overwritten"])
def test_broken_result_tables_heal_on_the_next_sweep(smoke, damage):
    layout = smoke["layout"]
    run_table = layout.run(MODEL, "x2-k4-Lall").table("test_metrics")
    summary = layout.table("test_summary")
    rows = _heals(smoke, [run_table, summary], damage)
    # only what was broken is recomputed (the config's evaluation, the summary tables)
    assert _recomputed(rows) == {f"config_assets {MODEL}|x2-k4-Lall", "summary_tables"}


def test_corrupted_token_chunks_are_rebuilt(smoke):
    train_chunks = smoke["layout"].corpus_path(MODEL, "train")
    test_sidecar = Path(f"{smoke['layout'].corpus_path(MODEL, 'test')}.json")
    rows = _heals(smoke, [train_chunks, test_sidecar], overwrite_middle)
    assert _recomputed(rows) == {f"model_assets {MODEL}"}


def test_corrupted_pipeline_checkpoint_is_retrained(smoke):
    """A checkpoint the pipeline wrote is its derived data: the next sweep retrains it (and
    re-evaluates it), and the sweep after that re-uses everything."""
    from mlsae_core import atomic

    run = smoke["layout"].run(MODEL, "x2-k8-Lall")
    overwrite_middle(run.weights)
    rows = smoke["sweep"]()
    assert all(r["success"] for r in rows)
    atomic.verify(run.directory, [run.weights.name])
    launched = {r["stage"]: r["launched"] for r in rows}
    assert "model.safetensors" in launched[f"config_assets {MODEL}|x2-k8-Lall"]["mlsae"]
    assert f"config_assets {MODEL}|x2-k8-Lall" in _recomputed(rows)
    assert not _recomputed(smoke["sweep"]())


def test_io_manager_load_names_a_corrupt_table(smoke, tmp_path):
    """Materializing a summary alone (as the UI can) over a corrupt input names the file."""
    import dagster as dg

    from mlsae_pipeline.definitions import build_definitions

    data = tmp_path / "data"
    for sub in ("tables", "saes"):
        shutil.copytree(smoke["layout"].root / sub, data / sub)
    part = data / "saes" / MODEL / "x2-k4-L1" / "test_metrics.parquet"
    overwrite_middle(part)
    defs = build_definitions("smoke", data, executor=dg.in_process_executor)
    result = dg.materialize(
        list(defs.assets),
        selection=["test_summary"],
        resources=dict(defs.resources),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = str(failure.step_failure_data.error)
    assert f"test_metrics: {part} " in error and "run `mlsae sweep` again" in error, error


def test_corrupted_checkpoint_is_refused_by_the_cli(smoke, tmp_path, capsys):
    from mlsae_core.cli import main

    run = smoke["layout"].run(MODEL, "x2-k8-L1")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for p in (run.weights, run.config, run.directory / "manifest.json"):
        shutil.copy(p, ckpt / p.name)
    args = ["test", "--repo_id", str(ckpt), "--device", "cpu", "--max_tokens", "64"]
    args += ["--splice_max_tokens", "0"]
    overwrite_middle(ckpt / "model.safetensors")
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{ckpt / 'model.safetensors'} does not match the sha256" in err, err


def test_a_process_that_reads_tables_exits_cleanly(tmp_path: Path) -> None:
    """Reading a table through atomic.read_parquet with torch loaded must not make the
    interpreter abort at exit (pyarrow 26 did so now and then from an in-memory buffer, exit
    status 134 after the work had succeeded); eight children make a 40% failure visible."""
    import subprocess
    import sys

    import pyarrow as pa

    from mlsae_core import atomic

    path = tmp_path / "t.parquet"
    atomic.write_parquet(path, pa.table({"step": list(range(100))}))
    child = (
        "import torch\nfrom mlsae_core import atomic\n"
        f"assert atomic.read_parquet({str(path)!r}).num_rows == 100\n"
    )
    codes = [subprocess.run([sys.executable, "-c", child]).returncode for _ in range(8)]
    assert codes == [0] * 8
