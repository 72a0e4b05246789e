"""The Triton sparse kernels against the pure-torch products (their oracle), float64 first.

On a machine without a GPU they run under Triton's CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

import functools
import warnings

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
    for fn in (
        functools.partial(triton_sparse.sparse_decode, torch_path=None),
        sparse.torch_decode,
    ):
        v = vals.clone().requires_grad_(True)
        w = table.detach().clone().requires_grad_(True)
        (fn(idx, v, w) * up).sum().backward()
        grads.append((v.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


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


def _sae_step(on: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one float64 MLSAE forward + backward, routed to the kernels or not."""
    torch.manual_seed(0)
    sae = MLSAE(12, 48, 3, auxk=6).double().to(DEVICE)
    x = torch.randn(2, 10, 12, dtype=torch.float64, device=DEVICE)
    with _triton_routing(on):
        out = sae(x)
        loss, _, _ = total_loss(x, out, 1 / 32)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in sae.parameters()]


def _assert_same_step(a, b) -> None:
    torch.testing.assert_close(a[0], b[0])
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb)


def test_sae_step_through_kernels_equals_torch_path_float64():
    """A whole MLSAE forward + backward with every sparse product routed to the kernels."""
    _assert_same_step(_sae_step(True), _sae_step(False))


@pytest.mark.parametrize("broken", [("decode", "gather_dot", "outer_sum"), ("gather_dot",)])
def test_failed_launch_falls_back_to_torch_with_one_warning(monkeypatch, broken):
    """A kernel whose launch raises (as Triton's does where it cannot build its C launcher):
    every failed product, forward or backward, is computed by the torch path, the kernels are
    off afterwards, and the process gets one warning naming MLSAE_TRITON=0. With only
    gather_dot broken, the forward runs the kernel and its backward falls back."""
    kernels = {**triton_sparse._kernels(), **dict.fromkeys(broken, _Broken())}
    monkeypatch.setattr(triton_sparse, "_kernels", lambda: kernels)
    monkeypatch.setattr(triton_sparse, "_failure", [])
    want = _sae_step(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _sae_step(True)
        got_again = _sae_step(True)
    _assert_same_step(got, want)
    _assert_same_step(got_again, want)
    named = [w for w in caught if "MLSAE_TRITON=0" in str(w.message)]
    assert len(named) == 1 and "C compiler" in str(named[0].message), [
        str(w.message) for w in caught
    ]
    assert not triton_sparse.available()


class _Broken:
    """A kernel whose launch raises, as Triton's does where it cannot build its C launcher."""

    def __getitem__(self, grid):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")


def _big(tmp_path, n: int, dtype=torch.float32) -> torch.Tensor:
    """n zeros, n past 2**31: on the CPU a sparse file mapped into memory (only the pages the
    kernel touches are ever allocated), on a GPU device memory (skipped where it does not fit)."""
    size = n * dtype.itemsize
    if DEVICE == "cuda":
        if torch.cuda.mem_get_info()[0] < 2 * size:
            pytest.skip(f"needs {2 * size / 2**30:.0f} GiB of free GPU memory")
        return torch.zeros(n, dtype=dtype, device=DEVICE)
    path = tmp_path / f"big{len(list(tmp_path.iterdir()))}.bin"
    with open(path, "wb") as f:
        f.truncate(size)
    return torch.from_file(str(path), shared=True, size=n, dtype=dtype)


_HALF = 2**30  # row 2 of a tensor 2**30 wide (or with a stride of 2**30) starts at 2**31


def test_decode_and_outer_sum_output_offsets_past_2_31(tmp_path):
    """`row * D` in decode and `lat * D` in outer_sum: each kernel launched over 3 rows (3
    latents) of a D = 2**30 wide output, its grid covering the first BLOCK_D columns only, so
    row 2 starts at element 2**31. The far rows must equal the torch products."""
    idx, vals, table, x = _case(5, torch.float32, n_rows=3, k=4, n=6, d=triton_sparse._BLOCK_D)
    kernels, block = triton_sparse._kernels(), triton_sparse._BLOCK_D
    out = _big(tmp_path, 2 * _HALF + block)
    kernels["decode"][(3, 1)](
        idx, vals, table, out, 4, _HALF, table.stride(0), table.stride(1),
        F64=False, BLOCK_D=block,
    )  # fmt: skip
    want = torch.nn.functional.embedding_bag(idx, table, per_sample_weights=vals, mode="sum")
    got = torch.stack([out[r * _HALF : r * _HALF + block] for r in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    lat = torch.tensor([[0, 1], [2, 1], [0, 2]], device=DEVICE)  # 3 latents, rows x [3, 128]
    flat = lat.reshape(-1)
    counts = torch.bincount(flat, minlength=3)
    kernels["outer_sum"][(3, 1)](
        torch.argsort(flat, stable=True), torch.cumsum(counts, 0) - counts, counts,
        vals[:, :2].contiguous().reshape(-1), x, out, 2, _HALF, x.stride(0), x.stride(1),
        F64=False, BLOCK_D=block,
    )  # fmt: skip
    dense = torch.zeros(3, 3, device=DEVICE).scatter_(1, lat, vals[:, :2]).t() @ x
    got = torch.stack([out[r * _HALF : r * _HALF + block] for r in range(3)])
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_strided_offsets_past_2_31(tmp_path):
    """`row * s_x0` (gather_dot's input rows) and `offs * s_t1` (the table's columns, in decode
    and gather_dot): 3 x 3 views whose strides of 2**30 put their last row or column at
    element 2**31, through the public wrappers."""
    idx, vals, _, _ = _case(6, torch.float32, n_rows=3, k=2, n=4, d=3)
    g = torch.Generator().manual_seed(6)
    table = _big(tmp_path, 2 * _HALF + 4).as_strided((4, 3), (1, _HALF))  # column c at c * 2**30
    x = _big(tmp_path, 2 * _HALF + 3).as_strided((3, 3), (_HALF, 1))  # row r at r * 2**30
    table.copy_(torch.randn(4, 3, generator=g))
    x.copy_(torch.randn(3, 3, generator=g))
    dense_table = table.contiguous()
    want = torch.nn.functional.embedding_bag(idx, dense_table, per_sample_weights=vals, mode="sum")
    torch.testing.assert_close(triton_sparse.decode(idx, vals, table), want)
    torch.testing.assert_close(
        triton_sparse.gather_dot(idx, x, table), (x.contiguous() @ dense_table.t()).gather(1, idx)
    )


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
