#!/usr/bin/env bash
# Set up (if needed) and materialize every asset of the default sweep through Dagster:
# SmolLM2 + the Brown corpus, offline (data/sweeps/default.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlsae sweep "$@"
