"""Triton kernels for the k-sparse products of a TopK SAE, used on CUDA: the decode and both of
its gradients (the encoder's are the same pair of products with the roles swapped).

* `decode`: out[i] = sum_j values[i, j] * table[indices[i, j]]            (gather k rows)
* `gather_dot`: out[i, j] = <table[indices[i, j]], x[i]>                 (grad of values)
* `outer_sum`: out[l] = sum over (i, j) with indices[i, j] == l of coefs[i, j] * rows[i]
  (grad of the table), deterministic: sorted by latent once, each latent sums its segment in
  a fixed order (no atomics), so a resumed GPU run stays bit-identical.

`sparse.py` dispatches here for CUDA tensors when Triton imports and MLSAE_TRITON is not "0",
and uses torch where a kernel fails to build or launch (`_launch`). The tests run the kernels
under Triton's CPU interpreter (tests/conftest.py). Accumulation is float32 (float64 for
float64 inputs), as embedding_bag's; offsets are int64 (rows x d passes 2**31 at scale).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

_BLOCK_D = 128
_failure: list[str] = []  # the first failed build or launch: the kernels stay off after it


class LaunchFailed(RuntimeError):
    """A kernel did not build or launch; the caller computes the product with torch."""


@functools.cache
def _triton() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # not installed (CPU-only machines without the dev extra)
        return None
    return triton, tl


def enabled_for(*tensors: torch.Tensor) -> bool:
    """All on CUDA (checked first: CPU calls never import Triton) and `available()`."""
    return all(t.is_cuda for t in tensors) and available()


def available() -> bool:
    """Triton present, not MLSAE_TRITON=0, and no kernel has failed to build or launch."""
    off = os.environ.get("MLSAE_TRITON", "1").strip() == "0"
    return not off and not _failure and _triton() is not None


def _launch(name: str, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
    """Run kernel `name`. Triton builds it and a C launcher at its first launch (a C compiler,
    Python's headers, libcuda); a failure (not a CUDA out-of-memory) turns the kernels off with
    one warning and raises LaunchFailed for the caller's torch fallback."""
    try:
        _kernels()[name][grid](*args, **constexprs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        if not _failure:
            _failure.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(
                f"the Triton sparse kernels failed to build or launch ({_failure[0][:300]}); "
                "using the pure-torch sparse products instead; set MLSAE_TRITON=0 to skip them",
                RuntimeWarning,
                stacklevel=2,
            )
        raise LaunchFailed(_failure[0]) from exc


@functools.cache
def _kernels() -> dict[str, Any]:
    """The kernels, defined on first use (so importing this module never needs Triton):
    compiled per GPU on first launch, or interpreted when TRITON_INTERPRET=1 at definition."""
    found = _triton()
    if found is None:
        raise RuntimeError(
            "Triton is not installed: pip install triton (CUDA builds of torch include it), "
            "or set MLSAE_TRITON=0 to use the pure-torch sparse products"
        )
    triton, tl = found

    @triton.jit
    def decode_kernel(
        idx_ptr, val_ptr, tab_ptr, out_ptr, K, D, s_t0, s_t1,
        F64: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)  # every offset int64: none wraps past 2**31
        offs = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        dmask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float64 if F64 else tl.float32)
        for j in range(K):
            lat = tl.load(idx_ptr + row * K + j)
            v = tl.load(val_ptr + row * K + j).to(acc.dtype)
            w = tl.load(tab_ptr + lat * s_t0 + offs * s_t1, mask=dmask, other=0.0)
            acc += v * w.to(acc.dtype)
        tl.store(out_ptr + row * D + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def gather_dot_kernel(
        idx_ptr, x_ptr, tab_ptr, out_ptr, K, D, s_x0, s_x1, s_t0, s_t1,
        F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        lat = tl.load(idx_ptr + row * K + ks, mask=kmask, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float64 if F64 else tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            dmask = offs < D
            x = tl.load(x_ptr + row * s_x0 + offs * s_x1, mask=dmask, other=0.0).to(acc.dtype)
            w = tl.load(
                tab_ptr + lat[:, None] * s_t0 + offs[None, :] * s_t1,
                mask=kmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(acc.dtype)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + row * K + ks, acc.to(out_ptr.dtype.element_ty), mask=kmask)

    @triton.jit
    def outer_sum_kernel(
        order_ptr, start_ptr, count_ptr, coef_ptr, rows_ptr, out_ptr, K, D, s_r0, s_r1,
        F64: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        lat = tl.program_id(0).to(tl.int64)
        offs = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        dmask = offs < D
        start = tl.load(start_ptr + lat)
        count = tl.load(count_ptr + lat)
        acc = tl.zeros([BLOCK_D], dtype=tl.float64 if F64 else tl.float32)
        for e in range(start, start + count):
            flat = tl.load(order_ptr + e)
            c = tl.load(coef_ptr + flat).to(acc.dtype)
            r = tl.load(rows_ptr + (flat // K) * s_r0 + offs * s_r1, mask=dmask, other=0.0)
            acc += c * r.to(acc.dtype)
        tl.store(out_ptr + lat * D + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)

    return {"decode": decode_kernel, "gather_dot": gather_dot_kernel, "outer_sum": outer_sum_kernel}


def _flat(indices: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """indices and a same-shaped tensor as contiguous [N, k]."""
    k = indices.shape[-1]
    return indices.reshape(-1, k).contiguous(), other.reshape(-1, k).contiguous()


def decode(indices: torch.Tensor, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., d] sum_j values[..., j] * table[indices[..., j]] (no autograd; see SparseDecode)."""
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx, val = _flat(indices, values)
    n_rows, d = idx.shape[0], table.shape[1]
    out = torch.empty(n_rows, d, dtype=table.dtype, device=table.device)
    if n_rows and d:
        grid = (n_rows, -(-d // _BLOCK_D))
        _launch(
            "decode", grid, idx, val, table, out, k, d, table.stride(0), table.stride(1),
            F64=table.dtype == torch.float64, BLOCK_D=_BLOCK_D,
        )  # fmt: skip
    return out.reshape(*lead, d)


def gather_dot(indices: torch.Tensor, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[N, k] <table[indices[i, j]], x[i]>, at x's dtype; indices [N, k], x [N, d]."""
    idx = indices.reshape(-1, indices.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    n_rows, k = idx.shape
    d = x2.shape[1]
    out = torch.empty(n_rows, k, dtype=x.dtype, device=x.device)
    if n_rows and k:
        block_k = max(16, 1 << (k - 1).bit_length())
        block_d = max(16, min(_BLOCK_D, 8192 // block_k))
        _launch(
            "gather_dot", (n_rows,), idx, x2, table, out, k, d,
            x2.stride(0), x2.stride(1), table.stride(0), table.stride(1),
            F64=x.dtype == torch.float64, BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
    return out.reshape(indices.shape)


def outer_sum(
    indices: torch.Tensor, coefs: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """[n_latents, d]: out[indices[i, j]] += coefs[i, j] * rows[i], in a fixed order."""
    idx, coef = _flat(indices, coefs)
    rows2 = rows.reshape(-1, rows.shape[-1])
    k, d = idx.shape[1], rows2.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_latents)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty(n_latents, d, dtype=rows.dtype, device=rows.device)
    if n_latents and d:
        grid = (n_latents, -(-d // _BLOCK_D))
        _launch(
            "outer_sum", grid, order, starts, counts, coef.reshape(-1), rows2, out, k, d,
            rows2.stride(0), rows2.stride(1),
            F64=rows.dtype == torch.float64, BLOCK_D=_BLOCK_D,
        )  # fmt: skip
    return out


class SparseDecode(torch.autograd.Function):
    """`decode` with its gradients by `gather_dot` (values) and `outer_sum` (table), or by
    differentiating `torch_path` (the same product in torch) where those fail to launch."""

    @staticmethod
    def forward(ctx, indices, values, table, torch_path):  # type: ignore[override]
        ctx.save_for_backward(indices, values, table)
        ctx.torch_path = torch_path
        return decode(indices, values, table)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        indices, values, table = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_table = None
        try:
            if ctx.needs_input_grad[1]:
                grad_values = gather_dot(indices, grad, table).to(values.dtype)
            if ctx.needs_input_grad[2]:
                grad_table = outer_sum(indices, values, grad, table.shape[0]).to(table.dtype)
        except LaunchFailed:  # the kernels are off now: differentiate the torch path
            inputs = (values.detach().requires_grad_(), table.detach().requires_grad_())
            with torch.enable_grad():
                grads = torch.autograd.grad(ctx.torch_path(indices, *inputs), inputs, grad)
            grad_values = grads[0] if ctx.needs_input_grad[1] else None
            grad_table = grads[1] if ctx.needs_input_grad[2] else None
        return None, grad_values, grad_table, None


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, table: torch.Tensor, torch_path: Callable
) -> torch.Tensor:
    """Differentiable `sparse.sparse_decode` (`torch_path`: its torch form, the backward's
    fallback). The table (the decoder weight [d, n] transposed) is made row-contiguous first,
    so gathered rows are not read n elements apart."""
    return SparseDecode.apply(indices, values.to(table.dtype), table.contiguous(), torch_path)
