"""k-sparse probing (docs/method.md §9) against sae-probes' own code and a scikit-learn oracle."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import make_scorer, roc_auc_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

from mlsae_core.analysis import probing
from mlsae_core.config import ConfigError, ProbeConfig
from mlsae_core.documents import DataError
from mlsae_core.lens import TunedLens
from mlsae_core.sae import MLSAE

SEED = probing.SEED
# Modules the functions below import; the rest of sae-probes' imports (xgboost, sae-lens,
# transformer-lens, its own package) serve functions these tests never call.
NEEDED_IMPORTS = {"numpy", "torch", "sklearn", "pandas", "typing", "dataclasses", "functools"}


def sae_probes(module: str, *names: str) -> SimpleNamespace:
    """`names` as defined in the installed sae_probes/<module>.py, run from its own source.

    `import sae_probes.<module>` would run the package's __init__, which imports xgboost,
    sae-lens and transformer-lens for its activation generators (sae-probes is installed
    without its dependencies, as scripts/setup.sh does), so the definitions are executed
    unchanged, with the module's own imports of what they use.
    """
    data = probing.data_dir()
    tree = ast.parse((data.parent / f"{module}.py").read_text(encoding="utf-8"))
    namespace: dict = {"DATA_PATH": data}  # sae_probes.constants.DATA_PATH
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            module_name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (module_name or "").split(".")[0] not in NEEDED_IMPORTS:
                continue
        elif not (isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names):
            continue
        exec(compile(ast.Module([node], type_ignores=[]), module, "exec"), namespace)
    return SimpleNamespace(**{name: namespace[name] for name in names})


TRAINING = sae_probes(
    "utils_training", "Metrics", "BestClassifierResults", "get_cv", "get_splits", "find_best_reg"
)
EVALS = sae_probes("run_sae_evals", "get_sorted_indices", "mean_act_normalization")
DATA = sae_probes(
    "utils_data", "get_binary_df", "get_numbered_binary_tags", "read_dataset_df",
    "read_numbered_dataset_df", "get_yvals", "get_train_test_indices",
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """sae-probes' fits and the oracle's on one thread too, as ours run (fast on a busy CPU)."""
    with probing.THREADS.limit(limits=1):
        yield


def synthetic_latents(n: int, n_latents: int = 48, seed: int = 0):
    """SAE-like latents: 6 nonnegative nonzeros per row, a few latents firing more for class 1
    and some never; balanced labels in random order."""
    g = np.random.default_rng(seed)
    y = g.permutation(np.arange(n) % 2)
    z = np.zeros((n, n_latents), dtype=np.float32)
    for i in range(n):
        favour = np.arange(4) if y[i] else np.arange(4, 8)
        weights = np.ones(n_latents - 4)  # the last 4 latents never fire
        weights[favour] = 6.0
        cols = g.choice(n_latents - 4, size=6, replace=False, p=weights / weights.sum())
        z[i, cols] = g.gamma(2.0, 1.0 + 0.5 * y[i], size=6)
    return z, y.astype(np.int64)


def split(z, y, n_train):
    return z[:n_train], y[:n_train], z[n_train:], y[n_train:]


# n_train picks sae-probes' validation scheme: one held-out tail (>= 128), 6 stratified folds
# (< 128), leave-2-out (<= 12), none (<= 3). Few k where there are many folds: each weakly
# regularised fit on separable rows runs to max_iter.
@pytest.mark.parametrize(
    ("n_train", "ks"), [(200, [1, 2, 4, 8, 16]), (60, [4]), (8, [1]), (3, [1, 2])]
)
def test_sparse_probes_match_sae_probes(n_train, ks):
    z, y = synthetic_latents(n_train + 80, seed=n_train)
    z_tr, y_tr, z_te, y_te = split(torch.from_numpy(z), y, n_train)
    ours = probing.probe_latents(z_tr, y_tr, z_te, y_te, ks)
    y_tr_t, y_te_t = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    order = EVALS.get_sorted_indices(z_tr, y_tr_t, EVALS.mean_act_normalization)
    assert torch.equal(probing.rank_latents(z_tr, y_tr), order)
    for k, metrics in ours:  # run_sae_eval's loop, normal setting, L2
        idx = order[:k]
        theirs = TRAINING.find_best_reg(
            z_tr[:, idx], y_tr_t, z_te[:, idx], y_te_t, n_jobs=-1, parallel=False,
            penalty="l2", seed=SEED,
        ).metrics  # fmt: skip
        assert metrics["test_auc"] == pytest.approx(theirs.test_auc, abs=1e-6), k
        assert metrics["test_acc"] == pytest.approx(theirs.test_acc, abs=1e-12), k
        assert metrics["test_f1"] == pytest.approx(theirs.test_f1, abs=1e-12), k
    if n_train >= 60:
        assert ours[-1][1]["test_auc"] > 0.8  # the planted latents are found


def test_residual_probe_matches_sae_probes():
    g = np.random.default_rng(3)
    y = g.permutation(np.arange(260) % 2)
    x = (g.normal(size=(260, 24)) + 0.4 * y[:, None] * g.normal(size=24)).astype(np.float32)
    x_tr, y_tr, x_te, y_te = split(x, y, 160)
    ours = probing.fit_probe(x_tr, y_tr, x_te, y_te)
    tensors = [torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te)]  # as sae-probes loads
    theirs = TRAINING.find_best_reg(*tensors, seed=SEED).metrics
    assert ours["test_auc"] == pytest.approx(theirs.test_auc, abs=1e-6)
    assert 0.6 < ours["test_auc"] < 1.0


@pytest.mark.parametrize("n_train", [200, 60])
def test_sparse_probes_match_an_independent_sklearn_oracle(n_train):
    """The protocol written again: float64 numpy ranking, GridSearchCV over C on the same
    validation scheme, refit on the seed-shuffled train split."""
    z, y = synthetic_latents(n_train + 80, seed=7)
    z_tr, y_tr, z_te, y_te = split(z.astype(np.float64), y, n_train)
    scale = np.abs(z_tr).sum(0) / ((z_tr != 0).sum(0) + 1e-6) + 1e-6
    diff = (z_tr[y_tr == 1] / scale).mean(0) - (z_tr[y_tr == 0] / scale).mean(0)
    order = np.argsort(-np.abs(diff), kind="stable")
    if n_train >= 128:
        val = min(int(0.2 * n_train), 100)  # the last 20% of the rows, at most 100
        cv = PredefinedSplit(np.r_[np.full(n_train - val, -1), np.zeros(val)])
    else:
        cv = StratifiedKFold(n_splits=6, shuffle=True, random_state=SEED)
    auc = make_scorer(roc_auc_score, response_method="predict_proba")
    ks = [1, 4, 16] if n_train >= 128 else [1, 4]
    z32 = [torch.from_numpy(a.astype(np.float32)) for a in (z_tr, z_te)]  # SAE latents' dtype
    ours = dict(probing.probe_latents(z32[0], y_tr, z32[1], y_te, ks))
    ranked = probing.rank_latents(z32[0], y_tr)
    for k, metrics in ours.items():
        cols = order[:k]
        assert np.array_equal(cols, ranked[:k].numpy()), k
        search = GridSearchCV(
            LogisticRegression(random_state=SEED, max_iter=1000),
            {"C": list(np.logspace(5, -5, 10))}, scoring=auc, cv=cv, refit=False,
        ).fit(z_tr[:, cols], y_tr)  # fmt: skip
        perm = np.random.RandomState(SEED).permutation(n_train)
        model = LogisticRegression(C=search.best_params_["C"], random_state=SEED, max_iter=1000)
        model.fit(z_tr[perm][:, cols], y_tr[perm])
        want = roc_auc_score(y_te, model.predict_proba(z_te[:, cols])[:, 1])
        assert metrics["test_auc"] == pytest.approx(want, abs=1e-6), k


def test_datasets_are_sae_probes_binary_sets_split_as_sae_probes_splits():
    assert probing.dataset_tags() == DATA.get_numbered_binary_tags()
    assert len(probing.dataset_tags()) == 113
    assert set(probing.DEFAULT_DATASETS) <= set(probing.dataset_tags())
    for tag in ("117_us_state_FL", "41_truthqa_tf"):  # int and string targets
        ds = probing.load_dataset(tag)
        df, y = DATA.read_numbered_dataset_df(tag), DATA.get_yvals(tag)
        num_train = min(len(df) - 100, 1024)  # generate_sae_activations_normal
        train, test = DATA.get_train_test_indices(y, num_train, len(df) - num_train - 1, 0.5, SEED)
        order = np.concatenate([train, test])
        assert ds.n_train == num_train
        assert list(ds.prompts) == df["prompt"].iloc[order].tolist()
        assert np.array_equal(ds.labels, y[order])


def test_max_prompts_caps_each_class_and_keeps_a_test_split():
    ds = probing.load_dataset("5_hist_fig_ismale", max_prompts=41)
    assert len(ds.prompts) == 39 and ds.n_train == 20  # 20 per class, half held out, one spare
    assert ds.labels.sum() == 20
    assert set(ds.labels[:20]) == set(ds.labels[20:]) == {0, 1}


def test_bad_inputs_get_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown .* 'hist_fig_ismale' \(did you mean 5_hist"):
        probing.resolve_datasets("default,hist_fig_ismale")
    with pytest.raises(ConfigError, match="no datasets given"):
        probing.resolve_datasets(" , ")
    with pytest.raises(DataError, match=r"one class after capping to max_prompts=1.*>= 6"):
        probing.load_dataset("92_glue_sst2", max_prompts=1)
    with pytest.raises(DataError, match="2 prompts per class"):
        probing.load_dataset("92_glue_sst2", max_prompts=5)
    monkeypatch.setattr(probing.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"not installed: run .*--no-deps sae-probes==0.4.2"):
        probing.resolve_datasets("default")


def test_a_checkpoint_without_a_model_is_refused(tmp_path):
    MLSAE(32, 64, k=4, metadata={"layers": [0, 1]}).save_pretrained(tmp_path / "run")
    with pytest.raises(ConfigError, match="no model to run"):
        probing.probe_checkpoint(tmp_path / "run", ProbeConfig(("5_hist_fig_ismale",), 20))


def test_tiny_model_end_to_end():
    """Last-token activations, SAE latents through a lens, SAE and residual rows in one table."""
    from tests.tiny import tiny_transformer

    tt = tiny_transformer("llama", n_layers=3, d=32)
    torch.manual_seed(0)
    sae = MLSAE(32, 64, k=4, auxk=None, metadata={"layers": [1, 2]})
    # 240 prompts: 140 train rows, so one validation split (few fits) as on real runs
    sets = [probing.load_dataset(t, max_prompts=240) for t in probing.DEFAULT_DATASETS[:2]]
    acts = probing.prompt_activations(tt, sets[0].prompts, [1, 2])
    for i in (0, 5, 17):  # batched and right-padded == alone
        ids = torch.tensor([tt.tokenizer(sets[0].prompts[i])["input_ids"]])
        torch.testing.assert_close(acts[:, i], tt.activations(ids, [1, 2])[:, 0, -1])
    lens = TunedLens(3, 32)
    with torch.no_grad():
        for p in lens.parameters():
            p.add_(0.1 * torch.randn_like(p))
    want = sae(lens.transform(acts, [1, 2])).topk
    z = probing.dense_latents(sae, acts[1], 2, lens)
    torch.testing.assert_close(z.gather(1, want.indices[1]), torch.relu(want.values[1]))
    assert int((z != 0).sum(1).max()) <= 4

    run_id = {"model": "tiny", "expansion_factor": 2, "k": 4, "layers": "1-2",
              "tuned_lens": True, "seed": 0}  # fmt: skip
    table = probing.probe(tt, sets, run_id, sae, lens=lens, max_k=4)
    assert table.column_names == [*run_id, *probing.PROBE_COLUMNS]
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 * (3 + 1)  # datasets x layers x (k = 1, 2, 4 + residual)
    assert {(r["source"], r["probe_k"]) for r in rows} == {
        ("sae", 1), ("sae", 2), ("sae", 4), ("residual", 32),
    }  # fmt: skip
    assert all(0 <= r[m] <= 1 for r in rows for m in ("test_auc", "test_acc", "test_f1"))
    assert {(r["n_train"], r["n_test"]) for r in rows} == {(140, 99)}
    residual = probing.probe(tt, sets, {"model": "tiny"}, layers=[1, 2]).to_pylist()
    assert table.schema.field("probe_k").type == probing.PROBE_COLUMNS["probe_k"]
    assert [{k: r[k] for k in residual[0]} for r in rows if r["source"] == "residual"] == residual
