"""Which dtype a computation runs in: the `precision` and `delta_dtype` settings, resolved.

Both settings take "auto", "float32" or "bfloat16" (config.Precision); "auto" is
bfloat16 where bf16 GEMMs are native (a GPU with bf16, a CPU with AVX512-BF16/AMX) and float32
elsewhere, because only there is bf16 faster. Training precision means `torch.autocast`
around the transformer forward and the SAE's encoder GEMM (the TopK selection); everything that
accumulates stays float32 (docs/performance.md, "Mixed precision").
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 GEMMs are native (and so faster than float32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # oneDNN's check for AVX512-BF16 / AMX
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(
    name: str | torch.dtype, device: torch.device | str, setting: str = "precision"
) -> torch.dtype:
    """'auto' -> bfloat16 where native on `device`, else float32; names -> dtypes."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"{setting}={name} is not allowed: float32 or bfloat16")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if key not in DTYPES:
        raise ValueError(
            f"{setting}={name!r} is not allowed: one of auto, float32, bfloat16 "
            "(float32 is exact; bfloat16 is faster where native)"
        )
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(
    device: torch.device | str, dtype: torch.dtype
) -> contextlib.AbstractContextManager[None]:
    """torch.autocast(dtype) on `device` for a low precision, a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
