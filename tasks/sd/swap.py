"""Weights swapped onto a loaded pipeline: a full fine-tune's saved components, or a LoRA in place of the last one.

So one base pipeline renders every set of weights, each swap reading only the weights that differ; each component
loads as its own class loads it, so the pixels equal those of a pipeline loaded for that set alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the caller has diffusers loaded already: it holds a pipeline
    from diffusers import DiffusionPipeline


def swap_components(pipe: DiffusionPipeline, folder: Path, dtype: torch.dtype) -> None:
    """Replace each module of `pipe` that `folder` holds a saved component of (diffusers' layout: unet/,
    text_encoder/, vae/ ...) with that component in `dtype`, loaded by the module's class; the other modules stay.
    A sample step's folder swaps the UNet (and text encoder), a fine-tuned pipeline's folder every module it has.
    The new modules are on the host: the caller moves the pipeline. A folder without a UNet holds no fine-tune."""
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"no unet/ in {folder}")
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and (folder / name).is_dir():
            setattr(pipe, name, type(module).from_pretrained(folder / name, dtype=dtype))


def swap_lora(pipe: DiffusionPipeline, folder: Path) -> None:
    """Put the LoRA saved in `folder` on the pipeline in place of any loaded before: unloading removes the adapter
    layers and leaves the base weights untouched, so this equals loading the LoRA onto a fresh base pipeline."""
    pipe.unload_lora_weights()
    pipe.load_lora_weights(folder)
