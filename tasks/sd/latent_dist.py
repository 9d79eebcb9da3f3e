"""The VAE's cached distribution: its file, and sampling a latent from it exactly as diffusers'
`latent_dist.sample` does.

Shared by the latents stage (which stores mean and logvar) and training (which samples them every step).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SIZES = "sizes"


def save_latent(path: Path, tensors: dict[str, torch.Tensor], sizes: dict[str, str]) -> None:
    """Mean and logvar, with SDXL's size facts as one JSON metadata entry: safetensors writes several entries in a
    random order, and one entry keeps the file the same to the byte run after run."""
    save_file(tensors, path, metadata={SIZES: json.dumps(sizes, sort_keys=True)})


def read_sizes(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get(SIZES, "{}"))


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from N(mean, exp(logvar)); equal to `vae.encode(x).latent_dist.sample(generator)` for the same state."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(generator)


def scale_latent(z: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Latents as the UNet sees them; SD 1.5 and SDXL have no shift, later VAEs do."""
    return (z - shift_factor) * scaling_factor if shift_factor is not None else z * scaling_factor
