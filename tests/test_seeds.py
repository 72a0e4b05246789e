"""Training seeds as a sweep dimension: a list of grids (the union), grid.seed, the seed run-id
column, and claim 1 judged against the baselines' seed spread on a real (tiny) sweep."""

from __future__ import annotations

import statistics

import pyarrow.parquet as pq
import pytest
import torch

from mlsae_core.config import ConfigError
from mlsae_pipeline.sweep import parse_sweep

SWEEP = """
name: seeds-smoke
models: [tiny-llama]
grid:
  - {expansion_factor: [2], k: [4], layers: [all]}
  - {expansion_factor: [2], k: [4], layers: [[1]], seed: [0, 1]}
sae: {auxk: 16, dead_tokens_threshold: 2000}
data: {dataset: tiny-text, max_length: 32, test_fraction: 0.2, max_tokens: 512, batch_size: 2}
train: {device: cpu, accumulate_grad_batches: 2, lr: 0.001, checkpoint_every: 100}
eval: {device: cpu, max_tokens: 128, splice_max_tokens: 64, batch_size: 4, n_examples: 2,
       n_context: 1, resid_tokens: 128}
"""


def _parse(text: str):
    import yaml

    return parse_sweep(yaml.safe_load(text), __import__("pathlib").Path("inline.yaml"))


def test_a_list_of_grids_is_the_union_of_their_combinations():
    sw = _parse(SWEEP)
    assert sw.sae_keys == ["x2-k4-Lall", "x2-k4-L1", "x2-k4-L1-s1"]
    spec = sw.run_spec(sw.point("x2-k4-L1-s1"), "tiny")
    # the seed is the training seed; the document split stays the sweep's train.seed
    assert spec.train.seed == 1 and spec.split_seed == 0 and spec.document_seed == 0
    one = _parse(SWEEP.replace("seed: [0, 1]", "seed: 3"))
    assert one.sae_keys == ["x2-k4-Lall", "x2-k4-L1-s3"]
    # without grid.seed every config trains with train.seed (the keys of old sweeps stay)
    plain = _parse(SWEEP.replace(", seed: [0, 1]", "").replace("layers: [[1]]", "layers: [[2]]"))
    assert plain.sae_keys == ["x2-k4-Lall", "x2-k4-L2"]


def test_a_config_listed_twice_across_grids_is_refused():
    with pytest.raises(ConfigError, match=r"same SAE config twice: \['x2-k4-Lall'\]"):
        _parse(SWEEP.replace("layers: [[1]], seed: [0, 1]", "layers: [all]"))
    with pytest.raises(ConfigError, match="seed"):
        _parse(SWEEP.replace("seed: [0, 1]", "seed: [zero]"))


@pytest.mark.slow
def test_baseline_seeds_through_the_pipeline(tmp_path):
    """Two seeds of the layer-1 baseline: different weights, the same held-out text, the
    seed column in every table, and single_layer_comparison / claims over both seeds."""
    from mlsae_core.layout import StorageLayout
    from mlsae_core.sae import MLSAE
    from tests.conftest import run_sweep_text

    sw, data = run_sweep_text(tmp_path, "seeds-smoke", SWEEP)
    layout = StorageLayout(data)
    runs = {key: layout.run("tiny-llama", key) for key in sw.sae_keys}
    saes = {key: MLSAE.from_pretrained(run.directory) for key, run in runs.items()}
    a, b = saes["x2-k4-L1"], saes["x2-k4-L1-s1"]
    assert not torch.equal(a.encoder.weight, b.encoder.weight)  # another initialisation
    assert a.metadata["split_seed"] == b.metadata["split_seed"] == 0
    assert (a.metadata["seed"], b.metadata["seed"]) == (0, 1)
    for key, run in runs.items():
        for name in ("test_metrics", "latent_dists", "layer_variance", "max_examples"):
            seeds = set(pq.read_table(run.table(name)).column("seed").to_pylist())
            assert seeds == {1 if key.endswith("-s1") else 0}, (key, name)
    # both baselines were evaluated on the same held-out tokens
    n_tokens = {
        key: pq.read_table(runs[key].table("layer_variance")).column("n_tokens").to_pylist()
        for key in ("x2-k4-L1", "x2-k4-L1-s1")
    }
    assert n_tokens["x2-k4-L1"] == n_tokens["x2-k4-L1-s1"]
    fvu = {
        key: next(
            r["fvu"]
            for r in pq.read_table(runs[key].table("test_metrics")).to_pylist()
            if r["layer"] == "1"
        )
        for key in sw.sae_keys
    }
    [row] = pq.read_table(layout.table("single_layer_comparison")).to_pylist()
    seeds = [fvu["x2-k4-L1"], fvu["x2-k4-L1-s1"]]
    assert row["layers"] == "0-3" and row["seed"] == 0 and row["n_single_seeds"] == 2
    assert row["mlsae_fvu"] == fvu["x2-k4-Lall"]
    assert row["single_fvu"] == pytest.approx(statistics.mean(seeds), rel=1e-12)
    assert row["single_fvu_std"] == pytest.approx(statistics.stdev(seeds), rel=1e-12)
    claims = pq.read_table(layout.table("claims")).to_pylist()
    claim1 = [r for r in claims if r["claim"] == 1]
    assert {r["n_seeds"] for r in claim1} == {2}
    assert "one seed" not in claim1[0]["reason"] and "2+ seeds" in claim1[0]["reason"]
    assert next(r for r in claim1 if r["statistic"] == "fvu")["baseline_spread"] > 0
    mmcs = pq.read_table(layout.table("mmcs")).to_pylist()
    refs = {r["reference"] for r in mmcs if r["layers"] == "0-3"}
    assert refs == {"self", "layers=1", "layers=1,seed=1"}
