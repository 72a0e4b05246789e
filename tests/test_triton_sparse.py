"""The Triton sparse kernels against the pure-torch products (their oracle), float64 first.

On a machine without a GPU they run under Triton's CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the dev extra (pip install -e .[dev])")

from mlsae_core import sparse, triton_sparse  # noqa: E402
from mlsae_core.losses import total_loss  # noqa: E402
from mlsae_core.sae import MLSAE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, dtype: torch.dtype, n_rows=24, k=5, n=40, d=150, transposed=True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_rows)])
    vals = torch.randn(n_rows, k, generator=g, dtype=dtype)
    if transposed:  # as the SAE passes it: decoder.weight [d, n] viewed as [n, d]
        table = torch.randn(d, n, generator=g, dtype=dtype).t()
    else:
        table = torch.randn(n, d, generator=g, dtype=dtype)
    x = torch.randn(n_rows, d, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (idx, vals, table, x)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transposed", [True, False])
def test_decode_equals_embedding_bag(dtype, transposed):
    idx, vals, table, _ = _case(0, dtype, transposed=transposed)
    want = torch.nn.functional.embedding_bag(idx, table, per_sample_weights=vals, mode="sum")
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_sparse.decode(idx, vals, table), want, **tol)
    # leading dims are kept: [L, N, k] -> [L, N, d]
    got3 = triton_sparse.decode(idx.reshape(2, 12, -1), vals.reshape(2, 12, -1), table)
    torch.testing.assert_close(got3.reshape(24, -1), want, **tol)


def test_gather_dot_equals_dense_float64():
    idx, _, table, x = _case(1, torch.float64)
    want = (x @ table.t()).gather(1, idx)
    torch.testing.assert_close(triton_sparse.gather_dot(idx, x, table), want)


def test_outer_sum_equals_dense_and_is_deterministic():
    idx, vals, table, x = _case(2, torch.float64)
    n = table.shape[0]
    want = torch.zeros(idx.shape[0], n, dtype=x.dtype, device=DEVICE).scatter_(1, idx, vals).t() @ x
    got = triton_sparse.outer_sum(idx, vals, x, n)
    torch.testing.assert_close(got, want)
    idx32, vals32, _, x32 = _case(2, torch.float32)
    a = triton_sparse.outer_sum(idx32, vals32, x32, n)
    b = triton_sparse.outer_sum(idx32, vals32, x32, n)
    assert torch.equal(a, b)  # fixed summation order: bit-identical reruns


def test_sparse_decode_gradients_equal_torch_path_float64():
    idx, vals, table, _ = _case(3, torch.float64)
    up = torch.randn(idx.shape[0], table.shape[1], dtype=torch.float64, device=DEVICE)
    grads = []
    for fn in (triton_sparse.sparse_decode, _torch_decode):
        v = vals.clone().requires_grad_(True)
        w = table.detach().clone().requires_grad_(True)
        (fn(idx, v, w) * up).sum().backward()
        grads.append((v.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def _torch_decode(idx, vals, table):
    with _triton_routing(False):
        return sparse.sparse_decode(idx, vals, table)


class _triton_routing:
    """Force sparse.py's dispatch to the kernels (or away from them) whatever the device."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        self.saved = triton_sparse.enabled_for
        triton_sparse.enabled_for = lambda *t: self.on
        return self

    def __exit__(self, *exc):
        triton_sparse.enabled_for = self.saved


def test_sae_step_through_kernels_equals_torch_path_float64():
    """A whole MLSAE forward + backward with every sparse product routed to the kernels."""
    results = []
    for on in (True, False):
        torch.manual_seed(0)
        sae = MLSAE(12, 48, 3, auxk=6).double().to(DEVICE)
        x = torch.randn(2, 10, 12, dtype=torch.float64, device=DEVICE)
        with _triton_routing(on):
            out = sae(x)
            loss, _, _ = total_loss(x, out, 1 / 32)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in sae.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_dispatch_only_for_cuda_tensors(monkeypatch):
    cpu = torch.zeros(2, 2)
    assert not triton_sparse.enabled_for(cpu)
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert triton_sparse.enabled_for(gpu)
        monkeypatch.setenv("MLSAE_TRITON", "0")
        assert not triton_sparse.enabled_for(gpu)


def _signature(name: str, f64: bool) -> dict[str, str]:
    """Argument types of kernel `name` for an ahead-of-time compile."""
    fp = "*fp64" if f64 else "*fp32"
    if name == "decode":
        ptrs = {"idx_ptr": "*i64", "val_ptr": fp, "tab_ptr": fp, "out_ptr": fp}
        ints = ("K", "D", "s_t0", "s_t1")
    elif name == "gather_dot":
        ptrs = {"idx_ptr": "*i64", "x_ptr": fp, "tab_ptr": fp, "out_ptr": fp}
        ints = ("K", "D", "s_x0", "s_x1", "s_t0", "s_t1")
    else:
        names = ("order_ptr", "start_ptr", "count_ptr", "coef_ptr", "rows_ptr", "out_ptr")
        ptrs = dict(zip(names, ("*i64", "*i64", "*i64", fp, fp, fp), strict=True))
        ints = ("K", "D", "s_r0", "s_r1")
    return {**ptrs, **dict.fromkeys(ints, "i32")}


def compile_all(arch: int = 90) -> dict[str, int]:
    """Compile every kernel (float32 and float64) for CUDA compute capability `arch` down to a
    cubin, without a GPU; returns {"name/f32|f64": cubin size}. Needs TRITON_INTERPRET unset
    for the whole process."""
    import os

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    sizes = {}
    for name, kernel in triton_sparse._kernels().items():
        for f64 in (False, True):
            constexprs: dict = {"F64": f64, "BLOCK_D": triton_sparse._BLOCK_D}
            if name == "gather_dot":
                constexprs["BLOCK_K"] = 32
            sig = {**_signature(name, f64), **dict.fromkeys(constexprs, "constexpr")}
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            sizes[f"{name}/{'f64' if f64 else 'f32'}"] = len(compiled.asm["cubin"])
    return sizes


def test_kernels_compile_for_hopper():
    """The interpreter does not run Triton's compiler; this does, for an H100/H200 (sm_90)
    target down to a cubin (no GPU needed), so a kernel that would not compile fails here.
    In a subprocess: Triton's own helpers were defined for the interpreter in this one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from tests.test_triton_sparse import compile_all as c; print(json.dumps(c(90)))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout.strip().splitlines()[-1])  # {name: cubin bytes}
    names = {f"{k}/{p}" for k in ("decode", "gather_dot", "outer_sum") for p in ("f32", "f64")}
    assert set(compiled) == names and all(n > 0 for n in compiled.values())
