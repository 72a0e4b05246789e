"""Mixed precision as a context: which dtype the transformer and the encoder GEMM run under.

A context variable (not a global) so nested blocks and threads each see their own setting;
`$MLSAE_AUTOCAST` gives the CLI the same switch without code.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

_AUTOCAST: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "mlsae_autocast", default=None
)
_AUTOCAST_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def mixed_precision(dtype: torch.dtype | str | None = torch.bfloat16) -> Iterator[None]:
    """Inside this block `train()` and `evaluate()` run the transformer and the encoder GEMM
    under `torch.autocast(dtype)` (bf16 by default; None turns it off).

    The TopK *selection* then uses low-precision pre-activations, but the k selected values,
    the decode, the losses, the weights and the optimiser stay float32. Meant for CUDA; on
    CPU it is honoured as well (CPU autocast) so the same code path can be tested anywhere.
    The environment variable MLSAE_AUTOCAST=bf16 has the same effect for the CLI.
    """
    if isinstance(dtype, str):
        dtype = _AUTOCAST_NAMES[dtype.lower()]
    token = _AUTOCAST.set(dtype)
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def autocast_dtype() -> torch.dtype | None:
    """The mixed-precision dtype in force: `mixed_precision(...)`, else $MLSAE_AUTOCAST."""
    dtype = _AUTOCAST.get()
    if dtype is None:
        env = os.environ.get("MLSAE_AUTOCAST", "").strip().lower()
        if env and env not in ("0", "off", "none", "fp32", "float32"):
            if env not in _AUTOCAST_NAMES:
                raise ValueError(
                    f"MLSAE_AUTOCAST={env!r} is not allowed: one of {sorted(_AUTOCAST_NAMES)}"
                )
            dtype = _AUTOCAST_NAMES[env]
    return dtype


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """torch.autocast for `device` when mixed precision is on, else a no-op."""
    dtype = autocast_dtype()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
