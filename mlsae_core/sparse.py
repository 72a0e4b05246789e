"""Sparse encoder/decoder products: the k-of-n structure of TopK is where the speed is.

A TopK SAE touches only k of n latents per vector, so the gradient through the encoder and
the whole decoder are sparse-dense products. Doing them densely (as a plain autograd graph
through `torch.topk` would) costs O(N*n*d); these cost O(N*k*d).

These are pure-torch implementations and the test oracle for the Triton kernels
(`triton_sparse.py`) that replace them for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlsae_core import triton_sparse

# Rows per chunk when a product needs a [rows, k, d] temporary; bounds peak memory.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunk(k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, k * d))


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, weight_t: torch.Tensor
) -> torch.Tensor:
    """sum_j values[..., j] * weight_t[indices[..., j]]: gather k dictionary rows per vector.

    indices, values: [..., k]; weight_t: [n_latents, d] (the decoder's columns as rows).
    Returns [..., d]. Differentiable in `values` and `weight_t` (embedding_bag's backward is
    itself sparse: it never builds a [N, n_latents] tensor).
    """
    if triton_sparse.enabled_for(weight_t, values):
        return triton_sparse.sparse_decode(indices, values, weight_t)
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
    """out[indices[i, j]] += coefs[i, j] * rows[i]: the transpose of `sparse_decode`.

    indices, coefs: [N, k]; rows: [N, d]; returns [n_latents, d]. This is the weight gradient
    of a k-sparse product (encoder rows picked by TopK; decoder columns gathered by the
    decode). It reuses embedding_bag's backward, which sorts the N*k indices once and sums
    each latent's rows: O(N*k*d) and no [N, k, d] temporary (an `index_add_` of the outer
    products was 5-8x slower and needed that temporary).
    """
    if triton_sparse.enabled_for(rows):
        return triton_sparse.outer_sum(indices.detach(), coefs.detach(), rows.detach(), n_latents)
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


def sparse_outer_sum_plain(
    indices: torch.Tensor, coefs: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """The same as `sparse_outer_sum` by `index_add_` of outer products: the test oracle."""
    k, d = indices.shape[-1], rows.shape[-1]
    out = torch.zeros(n_latents, d, dtype=rows.dtype, device=rows.device)
    step = _row_chunk(k, d)
    for s in range(0, rows.shape[0], step):
        contrib = coefs[s : s + step, :, None] * rows[s : s + step, None, :]  # [rows, k, d]
        out.index_add_(0, indices[s : s + step].reshape(-1), contrib.reshape(-1, d))
    return out


def gathered_preacts(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[N, k] <weight[indices[i, j]], x[i]> at x's precision, in row chunks (no [N, n])."""
    if triton_sparse.enabled_for(x, weight):
        return triton_sparse.gather_dot(indices, x, weight)
    k, d = indices.shape[-1], x.shape[-1]
    out = torch.empty(indices.shape, dtype=x.dtype, device=x.device)
    step = _row_chunk(k, d)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for s in range(0, x.shape[0], step):
            rows = weight[indices[s : s + step]].to(x.dtype)  # [rows, k, d]
            out[s : s + step] = torch.linalg.vecdot(rows, x[s : s + step, None, :])
    return out


class _SelectedPreacts(torch.autograd.Function):
    """values[i, j] = <weight[indices[i, j]], x[i]>, with a sparse backward.

    The forward values are supplied (gathered from the dense pre-activations the TopK needed
    anyway), so only the backward is computed here.
    """

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
    """Attach a sparse gradient to pre-activations chosen by TopK.

    x: [N, d] encoder inputs; weight: [n_latents, d]; indices: [N, k]; selected: [N, k] the
    values of (x @ weight.T) at `indices`, computed without grad.
    """
    if not (x.requires_grad or weight.requires_grad):
        return selected
    return _SelectedPreacts.apply(x, weight, indices, selected)
