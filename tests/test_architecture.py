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
            "figures": ["mmcs"], "prepare": []}  # fmt: skip


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
        assert set(raw.get("grid") or {}) <= set(GRID_KEYS)
    run_fields = {"layers", "tuned_lens"}  # RunSpec fields swept per point
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
