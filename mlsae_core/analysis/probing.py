"""k-sparse probing of SAE latents at every layer on the sae-probes datasets (docs/method.md §9).

Does a handful of latents carry what the model knows about a concept? Per binary dataset of the
`sae-probes` wheel (installed without its dependencies, for its data) and per layer: the
activation at each prompt's last token, its SAE latents ranked by |difference of class means| on
the train split, and a logistic regression on the top k (source 'sae'), or on the whole residual
vector, the ceiling (source 'residual'). Split, ranking and regression are sae-probes' own;
tests/test_probing.py checks them against its code.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import LeavePOut, StratifiedKFold
from threadpoolctl import ThreadpoolController  # scikit-learn's own dependency
from torch.nn.utils.rnn import pad_sequence

from mlsae_core.analysis.tables import F64, I32, STR, _table
from mlsae_core.config import ConfigError, ProbeConfig, resolve_device
from mlsae_core.documents import DataError
from mlsae_core.identity import resolve_layers, run_id_of
from mlsae_core.lens import TunedLens
from mlsae_core.runs import checkpoint_lens, checkpoint_transformer
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer

# Eight datasets for variety (people, places, sport, news, sentiment, grammar, truth, spam)
# with short prompts (median 3-30 tokens), so a CPU probes them in minutes; code, long
# reviews and medical abstracts (hundreds to thousands of tokens) are left to `all`.
DEFAULT_DATASETS = (
    "5_hist_fig_ismale", "123_world_country_United_Kingdom", "154_athlete_sport_football",
    "21_headline_istrump", "92_glue_sst2", "87_glue_cola", "36_sciq_tf", "96_spam_is",
)  # fmt: skip
SEED = 42  # sae-probes' fixed seed: the split, the folds, the regression
MAX_LENGTH = 1024  # sae-probes' max_seq_len: longer prompts keep their last tokens
MAX_TRAIN, TEST_RESERVE = 1024, 100  # sae-probes: num_train = min(size - 100, 1024)
MIN_PER_CLASS = 3  # the fewest prompts per class that still split into train and test
DEFAULT_MAX_K = ProbeConfig.max_k  # k = 1, 2, 4, ..., max_k
CS = np.logspace(5, -5, 10)  # find_best_reg's grid of inverse regularisation strengths
BATCH_TOKENS = 8192  # padded tokens per forward
# The fits are tiny (~2 ms single-threaded); two BLAS/OpenMP threads spin-waiting on a busy
# CPU made them 10-50x slower, so they run on one (same results).
THREADS = ThreadpoolController()
PROBE_COLUMNS = {
    "layer": I32, "dataset": STR, "probe_k": I32, "source": STR, "test_auc": F64,
    "test_acc": F64, "test_f1": F64, "n_train": I32, "n_test": I32,
}  # fmt: skip


@dataclass(frozen=True)
class ProbeDataset:
    """One dataset's prompts in sae-probes' split order: the train rows, then the test rows."""

    tag: str
    prompts: tuple[str, ...]
    labels: np.ndarray  # [n] int64 0/1, sae-probes' LabelEncoder order (sorted targets)
    n_train: int


def data_dir() -> Path:
    """The sae-probes wheel's data directory, found without importing the package (its
    __init__ imports xgboost, transformer-lens and sae-lens, which mlsae does not need)."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the sae-probes datasets are not installed: run `python -m pip install --no-deps "
            "sae-probes==0.4.2` (scripts/setup.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_csv(path: Path) -> pa.Table:
    stream = pa.input_stream(str(path), compression="zstd")
    return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(newlines_in_values=True))


def dataset_tags() -> list[str]:
    """The binary-classification datasets of sae-probes' master table (113 in 0.4.2), named
    by file, e.g. '5_hist_fig_ismale' (as sae-probes' `get_numbered_binary_tags`)."""
    master = _read_csv(data_dir() / "probing_datasets_MASTER.csv.zst").to_pylist()
    names = [r["Dataset save name"] for r in master if r["Data type"] == "Binary Classification"]
    return [name.split("/")[-1].split(".")[0] for name in names]


def resolve_datasets(datasets: str | Sequence[str]) -> list[str]:
    """'default', 'all', or tags (a list, or one comma-separated string) -> checked tags."""
    names = datasets.split(",") if isinstance(datasets, str) else list(datasets)
    tags, out = dataset_tags(), []
    for name in (n.strip() for n in names if n.strip()):
        if name in ("default", "all"):
            out += DEFAULT_DATASETS if name == "default" else tags
        elif name in tags:
            out.append(name)
        else:
            close = [t for t in tags if t.split("_", 1)[1] == name]
            close = close or difflib.get_close_matches(name, tags, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown sae-probes dataset {name!r}{hint}; pass 'default', 'all' (the "
                f"{len(tags)} binary ones) or tags named as in {data_dir() / 'cleaned_data'}"
            )
    if not out:
        raise ConfigError("no datasets given: pass 'default', 'all' or sae-probes tags")
    return list(dict.fromkeys(out))


def train_test_indices(y: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced train and test indices (sae-probes' `get_train_test_indices`), sized as
    sae-probes sizes them: min(n - 100, 1024) train, the rest but one test; under 200 rows
    (a small max_prompts) half are held out instead of 100."""
    n_train = min(len(y) - min(TEST_RESERVE, len(y) // 2), MAX_TRAIN)
    n_test = len(y) - n_train - 1
    rng = np.random.RandomState(seed)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    n_pos_train, n_pos_test = math.ceil(n_train / 2), math.ceil(n_test / 2)
    train_pos = rng.choice(pos, size=n_pos_train, replace=False)
    train_neg = rng.choice(neg, size=n_train - n_pos_train, replace=False)
    test_pos = rng.choice(np.setdiff1d(pos, train_pos), size=n_pos_test, replace=False)
    test_neg = rng.choice(np.setdiff1d(neg, train_neg), size=n_test - n_pos_test, replace=False)
    train = rng.permutation(np.concatenate([train_pos, train_neg]))
    return train, rng.permutation(np.concatenate([test_pos, test_neg]))


def load_dataset(tag: str, max_prompts: int | None = None, seed: int = SEED) -> ProbeDataset:
    """A dataset's prompts and 0/1 labels, class-balanced (at most max_prompts // 2 of each
    class, first in file order), split as sae-probes splits."""
    table = _read_csv(data_dir() / "cleaned_data" / f"{tag}.csv.zst")
    prompts, targets = table.column("prompt").to_pylist(), table.column("target").to_pylist()
    classes = sorted(set(targets))
    labels = np.array([classes.index(t) for t in targets], dtype=np.int64)
    per = min(int(np.sum(labels == c)) for c in range(len(classes))) if len(classes) == 2 else 0
    if max_prompts is not None:
        per = min(per, max_prompts // 2)
    if per < MIN_PER_CLASS:
        cap = "" if max_prompts is None else f" after capping to max_prompts={max_prompts}"
        raise DataError(
            f"dataset {tag} has {'one class' if per == 0 else f'{per} prompts per class'}"
            f"{cap}; probing needs {MIN_PER_CLASS} of each of two classes: pass max_prompts "
            f">= {2 * MIN_PER_CLASS} (--max_prompts) or another dataset"
        )
    keep = np.sort(np.concatenate([np.where(labels == c)[0][:per] for c in (0, 1)]))
    y = labels[keep]
    train, test = train_test_indices(y, seed)
    order = keep[np.concatenate([train, test])]
    return ProbeDataset(tag, tuple(prompts[i] for i in order), labels[order], len(train))


@torch.no_grad()
def prompt_activations(
    transformer: Transformer, prompts: Sequence[str], layers: Sequence[int]
) -> torch.Tensor:
    """[len(layers), n, d] float32 block outputs at each prompt's last token. Prompts are
    tokenized as sae-probes does (the tokenizer's defaults, long ones cut on the left),
    batched by length and right-padded: a causal model's last real token never sees padding."""
    ids = transformer.tokenizer(list(prompts))["input_ids"]
    ids = [seq[-min(MAX_LENGTH, transformer.max_context) :] for seq in ids]
    if any(not seq for seq in ids):
        raise DataError("a probing prompt has no tokens; probing reads its last token")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(layers), len(ids), transformer.d_model)
    start = 0
    while start < len(order):
        rows = order[start : start + max(1, BATCH_TOKENS // len(ids[order[start]]))]
        tokens = pad_sequence([torch.tensor(ids[i]) for i in rows], batch_first=True)
        acts = transformer.activations(tokens, layers)  # [L, B, P, d]
        last = torch.tensor([len(ids[i]) - 1 for i in rows])
        out[:, rows] = acts[:, torch.arange(len(rows)), last].float().cpu()
        start += len(rows)
    return out


@torch.no_grad()
def dense_latents(
    sae: MLSAE, x: torch.Tensor, layer: int, lens: TunedLens | None = None
) -> torch.Tensor:
    """[n, n_latents] float32 SAE latents (ReLU'd TopK, zeros elsewhere) of one layer's [n, d]
    activations, through the run's tuned lens if it was trained with one."""
    device = next(sae.parameters()).device
    x = x.to(device)
    if lens is not None:
        x = lens.transform(x[None], [layer])[0]
    topk = sae.encode(x).topk
    dense = torch.zeros(x.shape[0], sae.n_latents, device=device)
    return dense.scatter_(1, topk.indices, torch.relu(topk.values).float()).cpu()


def rank_latents(z_train: torch.Tensor, y_train: np.ndarray) -> torch.Tensor:
    """Latents by |difference of class means| after dividing each by its mean nonzero |value|
    (sae-probes' `get_sorted_indices` with `mean_act_normalization`, the same torch ops)."""
    col_means = z_train.abs().sum(dim=0) / ((z_train != 0).sum(dim=0) + 1e-6)
    z = z_train / (col_means + 1e-6)
    y = torch.as_tensor(y_train)
    diff = z[y == 1].mean(dim=0) - z[y == 0].mean(dim=0)
    return torch.argsort(torch.abs(diff), descending=True)


def _folds(y: np.ndarray, seed: int) -> list[tuple[Any, Any]]:
    """sae-probes' `get_cv` + `get_splits`: leave-2-out up to 12 rows, 6 stratified folds below
    128, else the last min(20%, 100) rows; only folds whose validation holds both classes."""
    n = len(y)
    if n >= 128:
        val = min(int(0.2 * n), 100)
        return [(np.arange(n - val), np.arange(n - val, n))]
    cv = LeavePOut(2) if n <= 12 else StratifiedKFold(n_splits=6, shuffle=True, random_state=seed)
    return [(t, v) for t, v in cv.split(np.zeros(n), y) if len(np.unique(y[v])) == 2]


@THREADS.wrap(limits=1)
def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    seed: int = SEED,
) -> dict[str, float]:  # fmt: skip
    """L2 logistic regression, C chosen by mean validation AUC over `_folds`, refit on the
    seed-shuffled train split (sae-probes' `find_best_reg`); test AUC, accuracy, weighted F1."""
    # float64, as sklearn makes of the torch tensors sae-probes passes (float32 would also tie
    # saturated probabilities and move the AUC)
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    C = 1.0  # sklearn's default, kept for 3 rows or fewer as sae-probes does

    def fit(c: float, rows: np.ndarray) -> LogisticRegression:
        with warnings.catch_warnings():  # sae-probes ignores them too: a weak C hits max_iter
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, random_state=seed, max_iter=1000)
            return model.fit(x_train[rows], y_train[rows])

    def fold_auc(c: float, t: np.ndarray, v: np.ndarray) -> float:
        if len(np.unique(y_train[t])) < 2:
            return 0.5
        return roc_auc_score(y_train[v], fit(c, t).predict_proba(x_train[v])[:, 1])

    if len(x_train) > 3:
        folds = _folds(y_train, seed)
        C = CS[int(np.argmax([np.mean([fold_auc(c, t, v) for t, v in folds]) for c in CS]))]
    model = fit(C, np.random.RandomState(seed).permutation(len(x_train)))
    pred = model.predict(x_test)
    return {
        "test_auc": float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])),
        "test_acc": float(accuracy_score(y_test, pred)),
        "test_f1": float(f1_score(y_test, pred, average="weighted")),
    }


def probe_latents(
    z_train: torch.Tensor, y_train: np.ndarray, z_test: torch.Tensor, y_test: np.ndarray,
    ks: Sequence[int], seed: int = SEED,
) -> list[tuple[int, dict[str, float]]]:  # fmt: skip
    """(k, test metrics) for a probe on the top k ranked latents, for each k."""
    order = rank_latents(z_train, y_train).numpy()
    tr, te = z_train.numpy(), z_test.numpy()
    return [(k, fit_probe(tr[:, order[:k]], y_train, te[:, order[:k]], y_test, seed)) for k in ks]


def probe_dataset(
    ds: ProbeDataset, acts: torch.Tensor, layers: Sequence[int], sae: MLSAE | None = None,
    lens: TunedLens | None = None, max_k: int = DEFAULT_MAX_K, seed: int = SEED,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows for one dataset from its activations [len(layers), n, d] (`prompt_activations`):
    the SAE's k-sparse probes, or with `sae` None the residual probes (probe_k = d)."""
    nt, rows = ds.n_train, []
    y_train, y_test = ds.labels[:nt], ds.labels[nt:]
    for x, layer in zip(acts, layers, strict=True):
        if sae is None:
            x_np = x.numpy()
            results = [(x.shape[-1], fit_probe(x_np[:nt], y_train, x_np[nt:], y_test, seed))]
        else:
            z = dense_latents(sae, x, layer, lens)
            ks = [2**i for i in range(int(math.log2(max(1, min(max_k, sae.n_latents)))) + 1)]
            results = probe_latents(z[:nt], y_train, z[nt:], y_test, ks, seed)
        source = "residual" if sae is None else "sae"
        rows += [
            {"layer": layer, "dataset": ds.tag, "probe_k": k, "source": source, **metrics,
             "n_train": nt, "n_test": len(y_test)}
            for k, metrics in results
        ]  # fmt: skip
    return rows


def probe(
    transformer: Transformer, datasets: Sequence[ProbeDataset], run_id: Mapping[str, Any],
    sae: MLSAE | None = None, layers: Sequence[int] | None = None, lens: TunedLens | None = None,
    max_k: int = DEFAULT_MAX_K, residual: bool = True, seed: int = SEED,
) -> pa.Table:  # fmt: skip
    """The `probes` table of `datasets` at `layers` (default: the SAE's trained layers, else
    every layer): the SAE's k-sparse probes if `sae` is given, the residual probes if
    `residual`; run-id columns from `run_id` (all six, or only `model` for residual rows kept
    once per model), then PROBE_COLUMNS."""
    if layers is None:
        layers = sae.metadata.get("layers") if sae is not None else None
    layers = resolve_layers(layers, transformer.n_layers)
    rows: list[dict[str, Any]] = []
    for ds in datasets:
        acts = prompt_activations(transformer, ds.prompts, layers)
        if sae is not None:
            rows += probe_dataset(ds, acts, layers, sae, lens, max_k, seed)
        if residual:
            rows += probe_dataset(ds, acts, layers, None, None, max_k, seed)
    return probes_table(run_id, rows)


def probes_table(run_id: Mapping[str, Any], rows: list[dict[str, Any]]) -> pa.Table:
    """The rows of `probe_dataset` under `run_id`'s columns, with an explicit schema."""
    return _table(
        run_id, {c: (t, [r[c] for r in rows]) for c, t in PROBE_COLUMNS.items()}, ["model"]
    )


def load_datasets(cfg: ProbeConfig) -> list[ProbeDataset]:
    """The datasets `cfg` names, each capped at cfg.max_prompts (errors before any compute)."""
    return [load_dataset(tag, cfg.max_prompts) for tag in resolve_datasets(cfg.datasets)]


def probe_checkpoint(
    repo_id: str | Path, cfg: ProbeConfig = ProbeConfig(), device: str = "auto",
    tuned_lens: str | Path | None = None, residual: bool = True,
) -> pa.Table:  # fmt: skip
    """`probe` for a checkpoint directory or hub id (ours, SAELens', sparsify's) at every layer
    it was trained on, with its transformer and tuned lens; residual rows carry its run id."""
    sets = load_datasets(cfg)
    device = resolve_device(device)
    sae = MLSAE.from_pretrained(repo_id, device=device)
    model_name = sae.metadata.get("model_name")
    if not model_name:
        raise ConfigError(
            f"{repo_id}: config.json does not say which model it was trained on (model_name), "
            "so there is no model to run; add model_name to its config.json"
        )
    transformer = checkpoint_transformer(repo_id, sae, model_name, device)
    lens = checkpoint_lens(repo_id, sae.metadata, transformer, tuned_lens)
    return probe(
        transformer, sets, run_id_of(sae), sae, lens=lens, max_k=cfg.max_k, residual=residual
    )
