"""Benchmarks and load tools: run from the repo root, e.g. `python -m benchmarks.bench`."""
