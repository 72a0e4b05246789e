"""Steering one latent at one layer, precisely (docs/explorer.md, "Steering, precisely").

Let x_l[p] be block l's output at position p, s_l[p] the standardization scale (std over d
of x_l[p], or 1 when the SAE does not standardize), d_j the unit decoder column of latent j,
and v_l[p] latent j's (ReLU'd top-k) value there. Changing a latent's value by delta changes
the SAE's reconstruction by delta * s_l[p] * d_j, so we add exactly that change to the true
residual stream (the SAE's reconstruction error is kept), at every non-special position of
the prompt, and the caller runs the rest of the model from block l + 1:

    x'_l[p] = x_l[p] + (v'[p] - v_l[p]) * s_l[p] * d_j

* mode "scale" (default): v'[p] = factor * v_l[p]. factor = 1 is the clean run exactly,
  factor = 0 ablates the latent, factor = 5 amplifies it; it does nothing where the latent
  is inactive.
* mode "add": v'[p] = v_l[p] + factor * a_j, with a_j the activation scale of latent j at
  layer l (`activation_scale`). This steers latents that are not active on the prompt.
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


__all__ = ["STEER_MODES", "SteerMode", "activation_scale", "steered_residual"]
