"""Class images stage: the base model's own renders of the class prompt, for prior preservation.

Each image is cached by everything that shapes it (model, prompt, sampler, size, seed, index), never by the count
or the dataset, so runs with the same class share them and asking for more renders only the new ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from tasks.core.atomic import link_or_copy
from tasks.core.config import PriorSection, RunConfig
from tasks.core.seeds import derive_seed
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, stage_key
from tasks.sd.models import ResolvedModel
from tasks.sd.render import (
    RenderError,
    RenderRequest,
    image_settings,
    load_pipeline_for,
    make_scheduler,
    planned_scheduler,
    render,
)

STAGE = "class_images"
ITEMS = "class_images-items"
CODE_VERSION = 3  # 2: base pipelines load without the SD 1.5 safety checker; 3: seeds from derive_seed
TRAINING_ONLY = ("enabled", "loss_weight")  # prior settings that shape training, not the images


@dataclass(frozen=True)
class ClassImagesInputs:
    """The base model, the class prompt with the class noun filled in, and the training resolution (square)."""

    model: ResolvedModel
    class_prompt: str
    resolution: int

    @classmethod
    def of(cls, config: RunConfig, model: ResolvedModel) -> ClassImagesInputs:
        return cls(model, config.class_prompt(), config.preprocess.resolution)


def class_seed(seed: int, index: int) -> int:
    """Image `index`'s own seed: stable across runs, unrelated between neighbours."""
    return derive_seed("class image", seed, index)


def stage_key_for(cfg: PriorSection, inputs: ClassImagesInputs) -> str:
    model, settings = inputs.model.identities, cfg.keyed(without=TRAINING_ONLY)
    return stage_key(
        STAGE, CODE_VERSION, settings, prompt=inputs.class_prompt, resolution=inputs.resolution, model=model
    )


def item_settings(cfg: PriorSection) -> dict[str, Any]:
    """The prior settings one image depends on: not the count, the batch size, or the prompt template."""
    return {**image_settings(cfg), "seed": cfg.seed}


def rendering_scheduler(cfg: PriorSection, model: ResolvedModel) -> dict[str, Any]:
    """The settings of the scheduler that `make_scheduler` gives the loaded pipeline, read without loading it."""
    try:
        return planned_scheduler(cfg.scheduler, model.path / "scheduler")
    except ValueError as err:
        raise StageError(STAGE, f"{err}; set prior.scheduler", item="prior.scheduler") from err


def item_key(cfg: PriorSection, inputs: ClassImagesInputs, scheduler: dict[str, Any], index: int) -> str:
    """Image `index`'s key: every component of the base model and every setting that changes its pixels."""
    return stage_key(
        ITEMS,
        CODE_VERSION,
        item_settings(cfg),
        model=inputs.model.identities,
        prompt=inputs.class_prompt,
        scheduler_config=scheduler,
        resolution=inputs.resolution,
        index=index,
    )


def request_for(cfg: PriorSection, inputs: ClassImagesInputs, index: int) -> RenderRequest:
    side = inputs.resolution
    seed = class_seed(cfg.seed, index)
    return RenderRequest(inputs.class_prompt, cfg.negative_prompt, seed, cfg.steps, cfg.guidance, side, side)


def _save_item(image: Image.Image, request: RenderRequest, index: int) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        image.save(folder / "image.png", format="PNG")
        return {"index": index, "seed": request.seed, "prompt": request.prompt}

    return build


def _render_missing(
    cfg: PriorSection, inputs: ClassImagesInputs, store: Store, keys: list[str], missing: list[int]
) -> int:
    """Load the base model and render the batches holding a `missing` index; returns how many items this call
    created."""
    try:
        pipe = load_pipeline_for(inputs.model, cfg.dtype, cfg.vae_slicing)
        make_scheduler(pipe, cfg.scheduler)
    except Exception as err:
        message = f"cannot load the base model ({type(err).__name__}: {err}); check model.id and its files"
        raise StageError(STAGE, message, str(inputs.model.path)) from err

    index_of = {request_for(cfg, inputs, index): index for index in range(len(keys))}
    needed = [request_for(cfg, inputs, index) for index in missing]
    created = 0
    try:
        for request, image in render(pipe, list(index_of), cfg.batch_size, "class images", needed):
            index = index_of[request]
            try:
                entry = store.get_or_create(ITEMS, keys[index], _save_item(image, request, index), item_settings(cfg))
            except Exception as err:
                raise StageError(STAGE, f"unexpected {type(err).__name__}: {err}", f"class image {index}") from err
            created += entry.created
    except RenderError as err:
        index = index_of[err.requests[0]]
        raise StageError(STAGE, f"rendering failed: {err}", f"class image {index}") from err
    return created


def build(cfg: PriorSection, inputs: ClassImagesInputs, store: Store, key: str) -> StageResult:
    """Make `cfg.num_images` class images, rendering only those no earlier run (of any dataset) has made."""
    scheduler = rendering_scheduler(cfg, inputs.model)
    keys = [item_key(cfg, inputs, scheduler, index) for index in range(cfg.num_images)]
    missing = [index for index, ikey in enumerate(keys) if store.get(ITEMS, ikey) is None]
    created = _render_missing(cfg, inputs, store, keys, missing) if missing else 0

    table = pd.DataFrame(
        {
            "id": [ikey[:16] for ikey in keys],
            "index": range(len(keys)),
            "seed": [class_seed(cfg.seed, index) for index in range(len(keys))],
            "prompt": inputs.class_prompt,
            "status": "ok",
            "image": [f"images/{ikey[:16]}.png" for ikey in keys],
        }
    )
    settings = {**item_settings(cfg), "prompt": inputs.class_prompt, "resolution": inputs.resolution}

    def write(folder: Path) -> dict[str, Any]:
        (folder / "images").mkdir()
        for ikey, image in zip(keys, table["image"], strict=True):
            link_or_copy(store.path(ITEMS, ikey) / "image.png", folder / image)
        table.to_csv(folder / "items.csv", index=False)
        (folder / "settings.json").write_text(
            json.dumps({**settings, "scheduler_config": scheduler}, indent=1, default=str)
        )
        return {"items": len(keys)}

    entry = store.get_or_create(STAGE, key, write, settings)
    loaded = (f"pipeline ({inputs.model.id})",) if missing else ()
    return StageResult(STAGE, key, entry.path, created, len(keys) - created, models_loaded=loaded)


stage = Stage(STAGE, "prior", stage_key_for, build, outputs={"class_images_dir": "images"})
run = stage.run  # the plain function: cached entry or build
