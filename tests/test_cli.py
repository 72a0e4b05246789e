"""The CLI as users run it: train, resume, test, and data-parallel training under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mlsae_core.cli import main
from mlsae_core.metrics import METRIC_COLUMNS
from mlsae_core.sae import MLSAE
from tests.tiny import tiny_transformer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "When Mary and John went to the store , John gave a drink to Mary . The quick brown fox "
    "jumps over the lazy dog . A cat sat on the mat and the dog sat on the log ."
).split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved like any local HF model, so the CLI loads it by path."""
    out = tmp_path_factory.mktemp("model")
    t = tiny_transformer("llama", n_layers=3, d=32)
    t.model.save_pretrained(out)
    t.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """40 small text documents."""
    out = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        idx = torch.randint(0, len(WORDS), (60,), generator=g).tolist()
        (out / f"doc{i:02d}.txt").write_text(" ".join(WORDS[j] for j in idx))
    return out


def train_args(model, corpus, out, *extra):
    return [
        "train", "--model_name", str(model), "--dataset", str(corpus), "--expansion_factor", "2",
        "-k", "4", "--max_length", "16", "--max_tokens", "1024", "--batch_size", "4",
        "--accumulate_grad_batches", "2", "--lr", "3e-3", "--checkpoint_every", "2",
        "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def test_train_then_test_writes_tidy_table(tiny_model_dir, corpus_dir, tmp_path):
    assert main(train_args(tiny_model_dir, corpus_dir, tmp_path / "sae")) == 0
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert cfg["n_inputs"] == 32 and cfg["n_latents"] == 64 and cfg["k"] == 4
    assert cfg["model_name"] == str(tiny_model_dir) and cfg["layers"] == [0, 1, 2]
    assert main(["test", "--repo_id", str(tmp_path / "sae"), "--max_tokens", "256",
                 "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    out_csv = tmp_path / "eval" / "test_metrics.csv"
    table = pq.read_table(out_csv.with_suffix(".parquet")).to_pylist()
    assert [r["layer"] for r in table] == ["0", "1", "2", "avg"]
    for col in METRIC_COLUMNS:
        assert col in table[0]
    for r in table:
        assert all(isinstance(r[c], float) for c in ("fvu", "dce", "kl", "logit_mse"))
        assert r["l0"] <= 4 and r["fvu"] > 0
    header = out_csv.read_text().splitlines()[0]
    assert header.replace('"', "").split(",")[:8] == [
        "model", "expansion_factor", "k", "layers", "tuned_lens", "seed", "layer", "mse",
    ]  # fmt: skip


def test_bad_flags_give_clear_errors(tiny_model_dir, corpus_dir, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, corpus_dir, tmp_path / "a", "--layers", "7")) == 2
    assert "layers=[7] is not allowed" in capsys.readouterr().err
    assert main(train_args(tiny_model_dir, corpus_dir, tmp_path / "b", "-k", "0")) == 2
    assert "k=0 is not allowed" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert main(train_args(tiny_model_dir, empty, tmp_path / "c")) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tiny_model_dir, corpus_dir, tmp_path):
    """Data-parallel training with 2 gloo ranks: runs, splits the budget, saves a sound model."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29531", "-m", "mlsae_core.cli",
        *train_args(tiny_model_dir, corpus_dir, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sae = MLSAE.from_pretrained(out)
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(64))
    state = json.loads((out / "training_state" / "state.json").read_text())
    assert state["done"] and state["run_config"]["world_size"] == 2
    # 1024 tokens / (4 seqs * 16 pos * 2 accum * 2 ranks) = 4 steps
    assert state["step"] == 4


def test_analyse_and_figures_commands(tiny_model_dir, corpus_dir, tmp_path):
    """One pass writes every table beside the checkpoint; figure commands read them."""
    ck = tmp_path / "sae"
    assert main(train_args(tiny_model_dir, corpus_dir, ck)) == 0
    args = ["--repo_id", str(ck), "--max_tokens", "256", "--n_examples", "4"]
    assert main(["analyse", *args, "--splice_max_tokens", "64"]) == 0
    for name in ("test_metrics", "latent_dists", "latent_layer_dists", "dists_summary",
                 "layer_variance", "max_examples"):  # fmt: skip
        table = pq.read_table(ck / f"{name}.parquet")
        assert table.num_rows > 0, name
        assert {"model", "expansion_factor", "k", "layers"} <= set(table.column_names), name
    assert (ck / "dists_heatmap.png").stat().st_size > 1000
    examples = pq.read_table(ck / "max_examples.parquet").to_pylist()
    assert all(r["activation"] > 0 for r in examples)

    figs = tmp_path / "figs"
    for name in ("dists_heatmaps", "dists_layer_std", "mmcs", "test_summary", "decoder_sim",
                 "prompt_heatmaps"):  # fmt: skip
        assert main(["figures", name, "--repo_id", str(ck), "--out", str(figs)]) == 0, name
    assert main(["figures", "resid_cos_sim", "--model_name", str(tiny_model_dir), "--dataset",
                 str(corpus_dir), "--max_length", "16", "--max_tokens", "256", "--out",
                 str(figs)]) == 0  # fmt: skip
    names = {p.name for p in figs.iterdir()}
    assert {"dists_layer_std.csv", "mmcs.csv", "test_summary.parquet"} <= names
    assert any(n.startswith("dists_heatmap_") and n.endswith(".pdf") for n in names)
    assert any(n.startswith("prompt_heatmap_") and n.endswith(".png") for n in names)
    assert any(n.startswith("resid_cos_sim_") and n.endswith(".png") for n in names)
    test_csv = (figs / "test.csv").read_text().splitlines()
    assert test_csv[0].startswith("model_name,expansion_factor,k,tuned_lens,layer,n_latents,")
    assert "train/fvu/avg" in test_csv[0] and "val/loss/delta/layer_2" in test_csv[0]
    assert len(test_csv) == 2  # one config
    assert (figs / f"test_{test_csv[1].split(',')[0]}_k.csv").exists()
    header = (figs / "mmcs.csv").read_text().splitlines()[0]
    assert header.split(",") == ["model_name", "expansion_factor", "k", "mean", "var", "std", "sem"]


@pytest.mark.slow
def test_two_torchrun_nodes_train_the_weights_of_one_process(tiny_model_dir, corpus_dir, tmp_path):
    """Two `torchrun --nnodes 2` agents (one process each, c10d rendezvous over 127.0.0.1, gloo)
    train to the weights one process reaches with the same global batch: per step, ranks x
    accumulation covers the same micro-batches as one process accumulating them all."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two-nodes"
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mlsae",
        "-m", "mlsae_core.cli", *train_args(tiny_model_dir, corpus_dir, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(agent, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    one = tmp_path / "one-process"
    assert main(train_args(tiny_model_dir, corpus_dir, one, "--accumulate_grad_batches", "4")) == 0
    state = json.loads((out / "training_state" / "state.json").read_text())
    assert state["run_config"]["world_size"] == 2 and state["step"] == 4
    two_nodes, single = MLSAE.from_pretrained(out), MLSAE.from_pretrained(one)
    want = single.state_dict()
    for name, got in two_nodes.state_dict().items():
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_probe_writes_the_table_of_the_library_and_never_the_run(
    tiny_model_dir, corpus_dir, tmp_path, capsys
):
    """`mlsae probe` writes probing.probe_checkpoint's table into --out (nothing into the run
    directory) and prints the mean AUC per layer; an unknown tag is one line naming the fix."""
    from mlsae_core.analysis import probing
    from mlsae_core.config import ProbeConfig

    run = tmp_path / "sae"
    assert main(train_args(tiny_model_dir, corpus_dir, run)) == 0
    before = sorted(p.name for p in run.iterdir())
    tags = ["5_hist_fig_ismale", "92_glue_sst2"]
    args = ["probe", "--repo_id", str(run), "--datasets", *tags, "--max_prompts", "40",
            "--max_k", "2", "--device", "cpu", "--out", str(tmp_path / "probes")]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in run.iterdir()) == before
    table = pq.read_table(tmp_path / "probes" / "probes.parquet")
    want = probing.probe_checkpoint(run, ProbeConfig(tuple(tags), 40, 2), "cpu")
    assert table.to_pylist() == want.to_pylist()
    rows = table.to_pylist()
    assert {(r["source"], r["probe_k"]) for r in rows} == {("sae", 1), ("sae", 2), ("residual", 32)}
    assert {r["layer"] for r in rows} == {0, 1, 2} and {r["dataset"] for r in rows} == set(tags)
    out = capsys.readouterr().out
    assert "mean test AUC" in out and "sae k=2" in out and "residual" in out
    assert main([*args[:3], "--datasets", "hist_fig_ismale", "--out", str(tmp_path / "p2")]) == 2
    assert "5_hist_fig_ismale" in capsys.readouterr().err  # the close match is named
