"""Sparse encoder/decoder products of a TopK SAE: O(N*k*d) where a dense graph costs O(N*n*d).

Pure torch, and the test oracle for the Triton kernels (`triton_sparse.py`) used on CUDA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mlsae_core import triton_sparse


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, weight_t: torch.Tensor
) -> torch.Tensor:
    """[..., d] sum_j values[..., j] * weight_t[indices[..., j]] (weight_t [n_latents, d]);
    differentiable, and embedding_bag's backward never builds a [N, n_latents] tensor."""
    if triton_sparse.enabled_for(weight_t, values):
        with contextlib.suppress(triton_sparse.LaunchFailed):  # it warned; torch computes it
            return triton_sparse.sparse_decode(indices, values, weight_t, torch_decode)
    return torch_decode(indices, values, weight_t)


def torch_decode(
    indices: torch.Tensor, values: torch.Tensor, weight_t: torch.Tensor
) -> torch.Tensor:
    """`sparse_decode` by embedding_bag, whatever the device (the kernels' oracle and fallback)."""
    k = indices.shape[-1]
    lead = indices.shape[:-1]
    out = F.embedding_bag(
        indices.reshape(-1, k),
        weight_t,
        per_sample_weights=values.reshape(-1, k).to(weight_t.dtype),
        mode="sum",
    )
    return out.reshape(*lead, weight_t.shape[-1])


def sparse_outer_sum(
    indices: torch.Tensor, coefs: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[indices[i, j]] += coefs[i, j] * rows[i] ([N, k], [N, d] -> [n_latents, d]): the
    weight gradient of a k-sparse product, by embedding_bag's backward (no [N, k, d] temporary;
    an `index_add_` of outer products was 5-8x slower)."""
    if triton_sparse.enabled_for(rows):
        with contextlib.suppress(triton_sparse.LaunchFailed):  # it warned; torch computes it
            return triton_sparse.outer_sum(
                indices.detach(), coefs.detach(), rows.detach(), n_latents
            )
    with torch.enable_grad():
        table = torch.zeros(n_latents, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        table.requires_grad_(True)
        out = F.embedding_bag(
            indices.detach().reshape(-1, indices.shape[-1]),
            table,
            per_sample_weights=coefs.detach().reshape(-1, indices.shape[-1]).to(rows.dtype),
            mode="sum",
        )
        (grad,) = torch.autograd.grad(out, table, rows.detach().reshape(out.shape))
    return grad


class _SelectedPreacts(torch.autograd.Function):
    """values[i, j] = <weight[indices[i, j]], x[i]>: the values are supplied (TopK computed
    them anyway), so only the sparse backward is computed here."""

    @staticmethod
    def forward(ctx, x, weight, indices, selected):  # type: ignore[override]
        ctx.save_for_backward(x, weight, indices)
        return selected

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(indices, grad, weight)
        if ctx.needs_input_grad[1]:
            grad_w = sparse_outer_sum(indices, grad, x, weight.shape[0]).to(weight.dtype)
        return grad_x, grad_w, None, None


def selected_preacts(
    x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Attach a sparse gradient to `selected` [N, k], the no-grad (x @ weight.T) at `indices`
    (x [N, d], weight [n_latents, d])."""
    if not (x.requires_grad or weight.requires_grad):
        return selected
    return _SelectedPreacts.apply(x, weight, indices, selected)
