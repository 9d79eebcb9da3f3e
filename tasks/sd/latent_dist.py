"""Sampling a latent from the VAE's cached distribution, exactly as diffusers' `latent_dist.sample` does.

Shared by the latents stage (which stores mean and logvar) and training (which samples them every step).
"""

from __future__ import annotations

import torch


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from N(mean, exp(logvar)); equal to `vae.encode(x).latent_dist.sample(generator)` for the same state."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(generator)


def scale_latent(z: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Latents as the UNet sees them; SD 1.5 and SDXL have no shift, later VAEs do."""
    return (z - shift_factor) * scaling_factor if shift_factor is not None else z * scaling_factor
