#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md, "GPU path"): run once from the repo root on a
# machine with a CUDA GPU whose python3 already has torch (CUDA), transformers, triton and
# pytest. Installs nothing. Writes to ${OUT:-gpu-results}/: gpu.txt, tests.log, bench.log,
# bench-b4.jsonl, bench-b32.jsonl.
#   1. the CUDA tests (tests/test_cuda.py) and the Triton kernels compiled for the GPU
#      (tests/test_triton_sparse.py), plus the float64 oracle tests of the fast paths;
#   2. the benchmark suite on the GPU (our lines only: the shared baseline is CPU-only),
#      at the CPU suite's batch (4 x 256) and at a GPU-sized batch (32 x 256).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLSAE_DATA_DIR=${MLSAE_DATA_DIR:-$(mktemp -d)}
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$out/gpu.txt"
timeout 300 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_sparse.py \
  tests/test_sparse.py tests/test_logit_difference.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
for bs in 4 32; do
  timeout 240 $py -m mlsae_core.bench --device cuda --no-smollm2 --threads 8 --batch-size "$bs" \
    --json "$out/bench-b$bs.jsonl" 2>&1 | tee -a "$out/bench.log"
done
exit "$tests_rc"
