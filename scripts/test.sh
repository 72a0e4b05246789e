#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, integration tests on the real SmolLM2 included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
