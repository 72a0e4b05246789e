"""Steering one latent at one layer (docs/explorer.md, "Steering, precisely"): the change of
the latent's value, decoded and un-standardized, is added to the true residual stream (its
reconstruction error kept) at every non-special position, and the caller runs the rest of the
model from block l + 1:

    x'_l[p] = x_l[p] + (v'[p] - v_l[p]) * s_l[p] * d_j

with v' = factor * v (mode "scale") or v + factor * a_j (mode "add", a_j: `activation_scale`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from mlsae_core.explorer.prompt import PromptResult

SteerMode = Literal["scale", "add"]
STEER_MODES: tuple[str, ...] = get_args(SteerMode)


def activation_scale(
    r: PromptResult,
    li: int,
    latent: int,
    example_max: float | None,
    dead_threshold: float,
) -> tuple[float, str]:
    """a_j for mode 'add', and where it came from: the top max-activating example's activation
    (`example_max`, when examples are loaded), else the latent's largest value at this layer
    on this prompt, else the mean non-zero latent value at this layer on this prompt."""
    if example_max is not None and example_max > 0:
        return example_max, "max-activating examples"
    here = torch.where(r.indices[li] == latent, r.values[li], 0.0)
    if float(here.max()) > 0:
        return float(here.max()), "this prompt"
    nz = r.values[li][r.values[li] > dead_threshold]
    if nz.numel():
        return float(nz.mean()), "mean latent value at this layer on this prompt"
    return 1.0, "default 1.0 (no latent fires at this layer)"


def steered_residual(
    r: PromptResult,
    layer: int,
    li: int,
    latent: int,
    column: torch.Tensor,
    factor: float,
    mode: SteerMode,
    scale: float = 1.0,
) -> torch.Tensor:
    """[P, d] x'_l: block `layer` (SAE layer index `li`) with `latent` steered (module doc).

    column: [d] the latent's unit decoder column; scale: a_j (mode 'add' only).
    """
    v = torch.where(r.indices[li] == latent, r.values[li], 0.0).sum(-1)  # [P]
    if mode == "scale":
        delta = (factor - 1.0) * v
    else:
        delta = torch.full_like(v, factor * scale)
    delta = torch.where(r.special, 0.0, delta)  # [P]
    x = r.clean.hidden[layer, 0]  # [P, d]
    return x + (delta * r.scale[li])[:, None] * column[None, :]
