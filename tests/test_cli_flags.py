"""Every flag of every `mlsae` subcommand (plugins and nested actions included) is one its
command reads; `-v` works after the subcommand; `--device` defaults to auto; each default is
stated once in --help. Fast: parsers and source only, no model."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import textwrap
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

from mlsae_core import cli, config, figure_commands
from mlsae_core.config import EvalConfig

NOT_FLAGS = {"help", "verbose"}  # argparse's own, and main()'s


def leaves() -> Iterator[tuple[str, argparse.ArgumentParser, Callable]]:
    """(command line, parser, the function that runs it) for every (nested) subcommand."""
    parser, commands = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        run = commands[name][1]
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            yield name, p, run
            continue
        for action, q in nested[0].choices.items():
            # `figures NAME` runs figure_commands.NAME; `lens train` runs the lens command
            yield (
                f"{name} {action}",
                q,
                getattr(figure_commands, action) if name == "figures" else run,
            )


LEAVES = {name: (p, run) for name, p, run in leaves()}


def offered(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions if a.dest not in NOT_FLAGS and a.dest != argparse.SUPPRESS}


def reads(fn: Callable, param: str | None = None) -> set[str]:
    """The attributes of its `args` parameter that `fn` reads, following the calls it passes
    `args` to; `from_args(Cls, args)` reads every generated flag of Cls."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    param = param or node.args.args[0].arg
    imported = {
        alias.asname or alias.name: (n.module, alias.name)
        for n in ast.walk(node)
        if isinstance(n, ast.ImportFrom)
        for alias in n.names
    }

    def resolve(name: str) -> object | None:
        if name in imported:
            module, attr = imported[name]
            return getattr(importlib.import_module(module), attr, None)
        return fn.__globals__.get(name)

    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == param:
            out.add(n.attr)
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
            continue
        positions = [i for i, a in enumerate(n.args) if isinstance(a, ast.Name) and a.id == param]
        if not positions:
            continue
        if n.func.id == "getattr" and isinstance(n.args[1], ast.Constant):
            out.add(n.args[1].value)
        elif n.func.id == "from_args":
            out |= set(config.cli_fields(resolve(n.args[0].id)))
        elif inspect.isfunction(callee := resolve(n.func.id)):
            names = list(inspect.signature(callee).parameters)
            for i in positions:
                out |= reads(callee, names[i])
    return out


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_every_flag_is_read_by_its_command(command):
    """A flag whose value no code of its command takes is dropped, not documented."""
    parser, run = LEAVES[command]
    unread = offered(parser) - reads(run)
    assert not unread, f"mlsae {command} offers flags it never reads: {sorted(unread)}"


def test_the_reader_finds_a_dead_flag():
    """The check above fails on a flag its command does not read."""

    def run(args):
        return args.used

    p = argparse.ArgumentParser()
    p.add_argument("--used")
    p.add_argument("--dead")
    assert offered(p) - reads(run) == {"dead"}


def one_pass_reads(analyses: tuple[str, ...], monkeypatch) -> set[str]:
    """The EvalConfig fields analyse.one_pass reads for `analyses` (its work faked out)."""
    from mlsae_core import analyse

    calls: dict = {}

    def evaluate(*args, **kwargs):
        calls.update(kwargs)
        return SimpleNamespace(rows=[], n_tokens=0, linear_head=None)

    monkeypatch.setattr(analyse, "evaluate", evaluate)
    for name in ("LayerDists", "TokenLayerVariance", "MaxExamples", "sae_row_encoder"):
        monkeypatch.setattr(analyse, name, MagicMock())

    class Recorder:
        def __init__(self) -> None:
            self.seen: set[str] = set()

        def __getattr__(self, name: str):
            self.seen.add(name)
            return getattr(EvalConfig(), name)

    cfg = Recorder()
    analyse.one_pass(MagicMock(), MagicMock(), MagicMock(), [0], cfg, analyses, progress=False)
    seen = cfg.seen
    if not calls["splice"]:  # evaluate uses the splice settings only when it splices
        seen -= {"splice_max_tokens", "delta_dtype"}
    return seen | {"device"}  # where the model is loaded (runs.load_for_test)


@pytest.mark.parametrize("command", sorted(cli.ANALYSIS_COMMANDS))
def test_evaluation_flags_are_those_its_analyses_read(command, monkeypatch):
    """`dists` offers no splice settings, `test` no example counts: an evaluation command's
    EvalConfig flags are the fields one_pass reads for its analyses."""
    analyses, _ = cli.ANALYSIS_COMMANDS[command]
    parser, _ = LEAVES[command]
    eval_flags = offered(parser) & set(config.cli_fields(EvalConfig))
    reads = one_pass_reads(analyses, monkeypatch)
    assert eval_flags == reads, (
        f"mlsae {command}: offers {sorted(eval_flags)}, reads {sorted(reads)}"
    )


def minimal_argv(command: str) -> list[str]:
    """The command line with a value for each required argument."""
    parser, _ = LEAVES[command]
    argv = command.split()
    for a in parser._actions:
        if a.required:
            value = str(a.choices[0]) if a.choices else "x"
            argv += [a.option_strings[0], value] if a.option_strings else [value]
    return argv


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_verbose_after_the_subcommand(command):
    parser, _ = cli.build_parser()
    assert parser.parse_args([*minimal_argv(command), "-v"]).verbose is True
    assert parser.parse_args(["-v", *minimal_argv(command)]).verbose is True
    assert parser.parse_args(minimal_argv(command)).verbose is False


def test_device_defaults_to_auto_everywhere():
    with_device = [c for c, (p, _) in LEAVES.items() if "device" in offered(p)]
    assert {"train", "test", "explore", "figures resid_cos_sim"} <= set(with_device)
    parser, _ = cli.build_parser()
    for command in with_device:
        assert parser.parse_args(minimal_argv(command)).device == "auto", command


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_each_default_is_stated_once(command):
    """Every optional value flag's help states its default once, in words where it is None."""
    parser, _ = LEAVES[command]
    for a in parser._actions:
        if not a.option_strings or a.required or a.nargs == 0 or a.dest in NOT_FLAGS:
            continue  # positionals, required flags, switches
        text = " ".join(a.help.split())
        assert text.count("(default:") == 1 or "(required unless" in text, (command, a.dest, text)
        assert "(default: None)" not in text, (command, a.dest)


def test_storage_root_has_one_flag():
    for command, (parser, _) in LEAVES.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert not flags & {"--root", "--db", "--dest"}, command
    rooted = {c for c, (p, _) in LEAVES.items() if "data_dir" in offered(p)}
    assert rooted == {"report", "sweep", "explore", "query", "fetch-brown", "prepare"}


def test_latent_page_out_of_range_is_404_naming_the_range():
    """GET /latent/<id> beyond the MLSAE's ids answers 404, its page naming 0..n-1 (as the
    API's /api/latent/<id> does); an id in range serves the page."""
    from fastapi.testclient import TestClient

    from mlsae_core.explorer.server import create_app
    from mlsae_core.sae import MLSAE
    from tests.tiny import tiny_transformer

    sae = MLSAE(32, 64, 4, auxk=None, metadata={"model_name": "tiny", "layers": [0, 1, 2]})
    with TestClient(create_app(sae, tiny_transformer("llama", n_layers=3, d=32))) as client:
        assert client.get("/latent/63").status_code == 200
        message = "latent=999999 is out of range: the MLSAE has 64 latents (0..63)"
        for path in ("/latent/999999", "/api/latent/999999"):
            page = client.get(path)
            assert page.status_code == 404 and message in page.text, path
        assert client.get("/latent/-1").status_code == 404


def test_bench_peers_writes_json_and_refuses_the_flags_it_ignores(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.bench --peers --json PATH` writes the peer records as JSON lines;
    a flag only the other lines read is refused rather than ignored."""
    import json

    from benchmarks import bench, peers

    records = [{"name": "peers/all-layers/x16-k32", "side": "target", "verdict": "met"}]
    monkeypatch.setattr(peers, "run", lambda *args: records)
    out = tmp_path / "peers.jsonl"
    assert bench.main(["--peers", "--quick", "--json", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert "target" in capsys.readouterr().out  # the text line still goes to the terminal
    with pytest.raises(SystemExit):
        bench.main(["--peers", "--reps", "3"])
    assert "--peers does not use --reps" in capsys.readouterr().err
