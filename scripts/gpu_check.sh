#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md, "GPU path"): run once from the repo root on a
# machine with a CUDA GPU whose python3 already has torch (CUDA), transformers, triton and
# pytest. Installs nothing. Writes to ${OUT:-gpu-results}/: gpu.txt, tests.log, bench.log,
# bench-b4.jsonl, bench-b32x2048.jsonl, peers.log. Its steps are capped at 120 + 90 + 150 + 90 s;
# run it with a timeout of 8 min.
#   1. the CUDA tests (tests/test_cuda.py), the Triton kernels against the torch path
#      (tests/test_triton_sparse.py), the float64 oracle tests of the fast paths and the
#      mixed-precision tests;
#   2. the benchmark suite on the GPU (our lines only: the shared baseline is CPU-only) at the
#      CPU suite's batch (4 x 256), in training's default precision (auto: bf16 on the GPU);
#   3. the Pythia-70m-shaped model at x64 k32 at batch 32 x 2048: the train and sae-step lines
#      and a timed 20M-token `train()` run (tokens/s, peak GPU memory, projected minutes for
#      1B tokens: `projected_1b_tokens_min`);
#   4. the peer lines on the GPU (benchmarks/peers.py --device cuda, one round): the same TopK
#      training by mlsae, sparsify (Triton decoder, bf16 autocast) and SAELens, held-out FVU and
#      ours/peer per line. Needs sae-lens and eai-sparsify importable; the step says which is
#      missing otherwise (an error line per side, not a result).
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
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_sparse.py \
  tests/test_sparse.py tests/test_logit_difference.py tests/test_precision.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 90 $py -m benchmarks.bench --device cuda --no-smollm2 --threads 8 --batch-size 4 \
  --json "$out/bench-b4.jsonl" 2>&1 | tee -a "$out/bench.log"
timeout 150 $py -m benchmarks.bench --device cuda --no-smollm2 --threads 8 --batch-size 32 \
  --max-length 2048 --only x64 --reps 3 --train-run 20000000 \
  --json "$out/bench-b32x2048.jsonl" 2>&1 | tee -a "$out/bench.log"
timeout 90 $py -m benchmarks.peers --device cuda --rounds 1 --threads 8 2>&1 | tee "$out/peers.log"
exit "$tests_rc"
