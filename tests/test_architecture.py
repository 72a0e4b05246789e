"""The shape of the code: dependencies one way, and every setting's default written once."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlsae_core import cli, config
from mlsae_core.config import DataConfig, EvalConfig, RunSpec, SAEConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "mlsae_core"
SETTINGS = (RunSpec, SAEConfig, DataConfig, TrainConfig, EvalConfig)


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


# ----- no import cycles ----------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _runtime_imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """Which of `modules` a file imports at run time, at any depth (function-local imports
    included; `if TYPE_CHECKING:` blocks excluded). `from a import b` names the module `a.b`
    when there is one, else `a`."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package upwards
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out & modules


def _import_graph() -> dict[str, set[str]]:
    files = [p for pkg in ("mlsae_core", "mlsae_pipeline") for p in (ROOT / pkg).rglob("*.py")]
    paths = {_module_name(p): p for p in files}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _runtime_imports(path, package, set(paths)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(_cycle_through(v, set(component), graph))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"{start} is in a component without a cycle through it")


def test_the_cycle_finder_names_a_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.y\n"
        "def f():\n    from . import z\n    from .w import v\n    import p.r\n"
    )
    modules = {"x.y", "p.q", "p.q.z", "p.q.w", "p.r"}
    assert _runtime_imports(probe, "p.q", modules) == {"p.q.z", "p.q.w", "p.r"}


def test_no_import_cycles():
    """mlsae_core and mlsae_pipeline import each other's modules without a cycle, counting
    imports inside functions too (a function-local import must not hide one)."""
    graph = _import_graph()
    assert "mlsae_core.transformer" in graph and "mlsae_pipeline.definitions" in graph
    cycles = [" -> ".join(c) for c in _cycles(graph)]
    assert not cycles, "import cycles: " + "; ".join(cycles)


# ----- one direction: pipeline -> core -----------------------------------------------------------
def test_core_never_imports_the_pipeline_or_dagster():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(CORE.rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[0] in ("mlsae_pipeline", "dagster")
    ]
    assert not offenders, offenders


def test_importing_every_core_module_loads_no_pipeline_module():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__main__.py"
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlsae_pipeline', 'dagster'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_pipeline_commands_reach_the_cli_through_the_entry_point_group():
    """`mlsae sweep` is registered by the pipeline package, not imported by the core."""
    _, commands = cli.build_parser()
    assert "sweep" in commands and "sweep" not in cli.COMMANDS
    out = subprocess.run(
        [sys.executable, "-m", "mlsae_core.cli", "sweep", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0 and "--keep_going" in out.stdout, out.stderr


# ----- settings defined once -------------------------------------------------------------------
def _subparser(name: str) -> argparse.ArgumentParser:
    parser, _ = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


REQUIRED = {"train": ["--out", "x"], "test": ["--repo_id", "x"], "analyse": ["--repo_id", "x"],
            "dists": ["--repo_id", "x"], "examples": ["--repo_id", "x"],
            "figures": ["resid_cos_sim"], "prepare": []}  # fmt: skip


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_cli_defaults_are_the_dataclass_defaults(command):
    """Each generated flag defaults to its field's default (or None: 'the checkpoint's')."""
    args = vars(_subparser(command).parse_args(REQUIRED[command]))
    checked = 0
    for cls in SETTINGS:
        for name, f in config.cli_fields(cls).items():
            if name not in args:
                continue
            if cls is EvalConfig and command == "train":
                continue  # train has no evaluation flags; a same-named field is DataConfig's
            owner = _flag_owner(command, name)
            if owner is not cls:
                continue
            value = args[name]
            if command != "train" and cls is DataConfig and name in ("dataset", "max_length"):
                if command != "figures":
                    assert value is None, (command, name, value)  # the checkpoint's
                    checked += 1
                    continue
            expected = f.default
            assert value == expected, f"mlsae {command} --{name}: {value!r} != {expected!r}"
            checked += 1
    assert checked >= 1


def _flag_owner(command: str, name: str) -> type:
    """Which dataclass a command's flag belongs to (names like max_tokens exist in two)."""
    if command == "train":
        return next(c for c in (RunSpec, SAEConfig, DataConfig, TrainConfig) if _has(c, name))
    if name in ("dataset", "max_length"):
        return DataConfig
    if name == "model_name":
        return RunSpec
    return EvalConfig


def _has(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def test_every_cli_field_has_help_and_a_flag():
    for cls in SETTINGS:
        for name, f in config.cli_fields(cls).items():
            assert f.description, f"{cls.__name__}.{name} has no help text"


def test_sweep_sections_are_the_dataclasses():
    """A sweep section with every field at its default parses to the dataclass default, and an
    empty section gives the same: the sweep adds no defaults of its own, and its sections are
    the settings classes themselves."""
    from mlsae_pipeline.sweep import parse_sweep

    full = {name: dataclasses.asdict(cls()) for name, cls in _sweep_sections().items()}
    for swept in ("expansion_factor", "k"):
        full["sae"].pop(swept)  # swept by grid:, not set in sae:
    for raw in ({"models": ["tiny-llama"], **full}, {"models": ["tiny-llama"]}):
        sweep = parse_sweep(raw, Path("inline.yaml"))
        assert sweep.data == DataConfig() and sweep.train == TrainConfig()
        assert sweep.eval == EvalConfig() and sweep.sae == SAEConfig()
    assert set(_sweep_sections().values()) == {SAEConfig, DataConfig, TrainConfig, EvalConfig,
                                                config.LensConfig}  # fmt: skip


def _sweep_sections() -> dict[str, type]:
    from mlsae_pipeline.sweep import _SECTIONS

    return dict(_SECTIONS)


def test_every_key_of_the_shipped_sweeps_maps_to_a_field():
    import yaml

    from mlsae_pipeline.sweep import GRID_KEYS, SWEEPS_DIR

    sections = _sweep_sections()
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for name, cls in sections.items():
            unknown = set(raw.get(name) or {}) - {f.name for f in dataclasses.fields(cls)}
            assert not unknown, f"{path.name}: {name}.{sorted(unknown)} map to no field"
        grids = raw.get("grid") or {}
        for grid in grids if isinstance(grids, list) else [grids]:
            assert set(grid) <= set(GRID_KEYS)
    run_fields = {"layers", "tuned_lens", "seed"}  # RunSpec (train.seed) fields swept per point
    assert set(GRID_KEYS) <= {f.name for f in dataclasses.fields(SAEConfig)} | run_fields


# Settings whose default must live in mlsae_core/config.py only (no literal default elsewhere).
GUARDED = {
    "dead_threshold",
    "dead_tokens_threshold",
    "auxk",
    "auxk_coef",
    "n_examples",
    "n_context",
    "delta_dtype",
    "prompt",
    "expansion_factor",
    "test_fraction",
    "splice_max_tokens",
}


def test_no_setting_default_is_typed_twice():
    """A function parameter named like a guarded setting may not carry a literal default."""
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args]
            pairs = list(zip(params[len(params) - len(a.defaults) :], a.defaults, strict=True))
            pairs += [(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d]
            for param, default in pairs:
                if param.arg in GUARDED and isinstance(default, ast.Constant):
                    if default.value is not None:
                        offenders.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                            f"({param.arg}={default.value!r})"
                        )
    assert not offenders, offenders


def test_the_public_api_resolves() -> None:
    """Every name `mlsae_core` re-exports lazily is importable (a rename would break users)."""
    import mlsae_core

    for name in mlsae_core.__all__:
        assert getattr(mlsae_core, name) is not None, name
