"""The training objective (docs/method.md §3): per-layer FVU plus the AuxK dead-latent loss.

Kept apart from the model so evaluation and benchmarks reuse exactly the numbers training
optimises.
"""

from __future__ import annotations

import torch

from mlsae_core.sae import STD_EPS, AutoencoderOutput


def fvu_per_layer(x: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """[n_layers] sum||r - x||^2 / sum||x - xbar_l||^2 over the tokens of each layer.

    x, recons: [n_layers, *tokens, d].
    """
    x2 = x.reshape(x.shape[0], -1, x.shape[-1])
    r2 = recons.reshape_as(x2)
    err = (r2 - x2).pow(2).sum(dim=(1, 2))
    var = (x2 - x2.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    return err / var.clamp_min(1e-12)


def auxk_loss(inputs: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
    """||e - e_aux||^2 / ||e - mean(e)||^2, e the main error in standardized space.

    0 when no latent is dead (no auxk reconstruction).
    """
    if out.auxk_recons is None:
        return inputs.new_zeros(())
    if out.stats is not None:
        x_hat = (inputs - out.stats.mean) / (out.stats.std + STD_EPS)
        r_hat = (out.recons - out.stats.mean) / out.stats.std.clamp_min(1e-12)
    else:
        x_hat, r_hat = inputs, out.recons
    e = (x_hat - r_hat).detach().reshape(-1, inputs.shape[-1])
    e_aux = out.auxk_recons.reshape_as(e)
    denom = (e - e.mean(dim=0, keepdim=True)).pow(2).sum()
    loss = (e - e_aux).pow(2).sum() / denom.clamp_min(1e-12)
    return torch.nan_to_num(loss, nan=0.0)


def total_loss(
    x: torch.Tensor, out: AutoencoderOutput, auxk_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, main FVU averaged over layers, aux) for x: [n_layers, *tokens, d]."""
    main = fvu_per_layer(x, out.recons).mean()
    aux = auxk_loss(x, out)
    return main + auxk_coef * aux, main, aux
