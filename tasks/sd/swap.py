"""Weights swapped onto a loaded pipeline: a full fine-tune's saved components, or a LoRA in place of the last one.

So one base pipeline renders every set of weights, each swap reading only the weights that differ; each component
loads as its own class loads it, so the pixels equal those of a pipeline loaded for that set alone.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the caller has diffusers loaded already: it holds a pipeline
    from diffusers import DiffusionPipeline


def component_class(spec: list[str]) -> type:
    """The class model_index.json names for a component, e.g. `["diffusers", "UNet2DConditionModel"]`; a pipeline's
    own module goes by its short name there (`["stable_diffusion", "StableDiffusionSafetyChecker"]`)."""
    library, class_name = spec
    try:
        module = importlib.import_module(library)
    except ModuleNotFoundError:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    return getattr(module, class_name)


def saved_components(base: Path, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Each component `folder` holds a saved copy of, loaded in `dtype` by the class the base pipeline names for it:
    what to pass to the base's `from_pretrained` so it never loads the components they replace. A folder without a
    UNet holds no fine-tune."""
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"no unet/ in {folder}")
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: component_class(spec).from_pretrained(folder / name, dtype=dtype)
        for name, spec in index.items()
        if isinstance(spec, list) and spec[0] is not None and (folder / name).is_dir()
    }


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
