#!/usr/bin/env bash
# The GPU check (README "On a GPU"; docs/performance.md "GPU path"). One command from the repo
# root of a machine with a CUDA GPU, after the README's setup:
#   bash scripts/gpu_check.sh
# PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python where setup made it,
# else python3, e.g. a machine's own CUDA torch with transformers, triton and pytest);
# OUT=dir the results folder (default gpu-results/). Installs nothing. Steps, capped at
# 45 + 120 + 75 + 150 + 75 s (under 8 minutes in all):
#   0. proves CUDA works, else stops with exit 2 and a FAIL line saying why: device name and
#      driver, torch.version.cuda, torch.cuda.is_available(), a bf16 matmul checked against
#      float32;
#   1. the CUDA tests (tests/test_cuda.py), the Triton kernels against the torch path, compiled
#      on this GPU (tests/test_triton_sparse.py: a kernel that does not build fails here), the
#      rank-to-GPU tests, the float64 oracle tests of the fast paths and the mixed-precision
#      tests; every skipped test is listed with its reason;
#   2. the benchmark suite on the GPU at the CPU suite's batch (4 x 256), in training's default
#      precision (auto: bf16 on the GPU);
#   3. the Pythia-70m-shaped model at x64 k32 at batch 32 x 2048: the train and sae-step lines
#      and a timed 20M-token `train()` run (tokens/s, peak GPU memory, projected minutes for
#      1B tokens: `projected_1b_tokens_min`);
#   4. the peer lines on the GPU (benchmarks/peers.py --device cuda, one round): mlsae,
#      sparsify and SAELens; a missing peer is an error line for its side, not a result.
# Writes gpu.txt, tests.log, bench.log, bench-b4.jsonl, bench-b32x2048.jsonl, peers.log.
# Exit status: 2 when CUDA does not work, else the tests' (0 when they pass).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLSAE_DATA_DIR=${MLSAE_DATA_DIR:-$(mktemp -d)}
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
echo "python: $py" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$out/gpu.txt"
timeout 45 "$py" - <<'PY' 2>&1 | tee -a "$out/gpu.txt"
import sys

import torch

print("torch", torch.__version__, "torch.version.cuda", torch.version.cuda)
if torch.version.cuda is None:
    sys.exit("FAIL: this torch is a CPU build; rerun setup with MLSAE_TORCH=cuda (README, On a GPU)")
print("torch.cuda.is_available()", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit(f"FAIL: CUDA is not usable: torch {torch.__version__} (CUDA {torch.version.cuda}) "
             "sees no GPU; check nvidia-smi, and the driver this build needs (README, On a GPU)")
props = torch.cuda.get_device_properties(0)
print(f"device {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB,"
      f" {torch.cuda.device_count()} visible)")
try:  # the newest CUDA the driver supports (its version number is nvidia-smi's line above)
    import ctypes

    v = ctypes.c_int()
    ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
    print(f"driver supports CUDA {v.value // 1000}.{v.value % 1000 // 10}")
except OSError as exc:
    print("driver: libcuda.so.1 not loadable:", exc)
g = torch.Generator(device="cuda").manual_seed(0)
a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
torch.backends.cuda.matmul.allow_tf32 = False
want = a @ b
err = ((a.bfloat16() @ b.bfloat16()).float() - want).norm() / want.norm()
print(f"bf16 matmul relative error vs float32: {err:.2e}")
if not err < 1e-2:  # bf16 keeps 8 bits of mantissa: about 4e-3 on random data
    sys.exit(f"FAIL: the bf16 matmul is wrong (relative error {err:.2e})")
import triton  # noqa: E402  (the kernels' compiler; CUDA builds of torch ship it)
import transformers  # noqa: E402

print("triton", triton.__version__, "transformers", transformers.__version__, "\nCUDA works")
PY
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "gpu_check: FAIL: CUDA does not work here (above, and $out/gpu.txt); nothing else ran" >&2
    exit 2
fi
timeout 120 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  tests/test_triton_sparse.py tests/test_devices.py tests/test_sparse.py \
  tests/test_logit_difference.py tests/test_precision.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 75 "$py" -m benchmarks.bench --device cuda --no-smollm2 --threads 8 --batch-size 4 \
  --json "$out/bench-b4.jsonl" 2>&1 | tee "$out/bench.log"
timeout 150 "$py" -m benchmarks.bench --device cuda --no-smollm2 --threads 8 --batch-size 32 \
  --max-length 2048 --only x64 --reps 3 --train-run 20000000 \
  --json "$out/bench-b32x2048.jsonl" 2>&1 | tee -a "$out/bench.log"
timeout 75 "$py" -m benchmarks.peers --device cuda --rounds 1 --threads 8 2>&1 | tee "$out/peers.log"
exit "$tests_rc"
