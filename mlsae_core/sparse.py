"""Sparse encoder/decoder products: the k-of-n structure of TopK is where the speed is.

A TopK SAE touches only k of n latents per vector, so the gradient through the encoder and
the whole decoder are sparse-dense products. Doing them densely (as a plain autograd graph
through `torch.topk` would) costs O(N*n*d); these cost O(N*k*d).

These are pure-torch implementations and the test oracle for any faster kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    k = indices.shape[-1]
    lead = indices.shape[:-1]
    out = F.embedding_bag(
        indices.reshape(-1, k),
        weight_t,
        per_sample_weights=values.reshape(-1, k).to(weight_t.dtype),
        mode="sum",
    )
    return out.reshape(*lead, weight_t.shape[-1])


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
            grad_w = torch.zeros_like(weight)
            k, d = indices.shape[-1], x.shape[-1]
            step = _row_chunk(k, d)
            for s in range(0, x.shape[0], step):
                idx = indices[s : s + step]  # [rows, k]
                contrib = grad[s : s + step, :, None] * x[s : s + step, None, :]  # [rows, k, d]
                grad_w.index_add_(0, idx.reshape(-1), contrib.reshape(-1, d).to(weight.dtype))
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
