"""Test-session setup shared by every test module."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (mlsae_core.triton_sparse) run under Triton's CPU
# interpreter, so their tests check the same kernel code the GPU compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
