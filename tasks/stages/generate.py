"""Generate stage: sample images from the fine-tuned model, its checkpoints and (optionally) the base model.

Each image is cached by its weights and everything that shapes its pixels, never by batch or list position, so
changing one prompt renders only that prompt's images and a fully cached run loads no model. Missing images render on
one base pipeline that wears each set of weights in turn, so the base loads once per stage, not once per set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tasks.core.atomic import link_or_copy
from tasks.core.config import GenerateSection, RunConfig, fill_prompt
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, stage_key
from tasks.core.tables import read_json
from tasks.sd.layout import WEIGHTS_DIR
from tasks.sd.models import ResolvedModel
from tasks.sd.render import (
    RenderError,
    RenderRequest,
    image_settings,
    load_pipeline_for,
    make_scheduler,
    planned_scheduler,
    prepare,
    render,
    saved_scheduler,
)
from tasks.sd.swap import saved_components, swap_components, swap_lora

if TYPE_CHECKING:  # imported where a pipeline is loaded: a fully cached run never pays for diffusers
    from diffusers import DiffusionPipeline

STAGE = "generate"
ITEMS = "generate-items"
CODE_VERSION = 2  # 2: base pipelines load without the SD 1.5 safety checker
COLUMNS = ["id", "kind", "step", "template", "prompt", "seed", "model", "image"]


@dataclass(frozen=True)
class GenerateInputs:
    """The base model, the train stage's result, the words that fill prompt templates, and the training size."""

    model: ResolvedModel
    train: StageResult
    token: str
    class_name: str
    resolution: int

    @classmethod
    def of(cls, config: RunConfig, model: ResolvedModel, train: StageResult) -> GenerateInputs:
        data = config.data
        return cls(model, train, data.token, data.class_name, config.preprocess.resolution)


@dataclass(frozen=True)
class Weights:
    """One set of weights images come from: the fine-tuned model, one sample step of training, or the base.

    `identity` is what item keys hash in place of any path; `folder` holds the weights on top of the base
    (None for the base itself); `scheduler_dir` is the scheduler config the pipeline starts from.
    """

    name: str
    kind: str
    step: int
    label: str
    identity: Any
    folder: Path | None
    scheduler_dir: Path


@dataclass(frozen=True)
class Item:
    """One image: its weights, the template it came from, what the renderer draws, and its cache key."""

    weights: Weights
    template: str
    request: RenderRequest
    key: str

    @property
    def id(self) -> str:
        return self.key[:16]

    @property
    def name(self) -> str:
        """How errors and logs name the image."""
        return f"{self.request.prompt} seed {self.request.seed}"


def stage_key_for(cfg: GenerateSection, inputs: GenerateInputs) -> str:
    return stage_key(
        STAGE,
        CODE_VERSION,
        cfg.keyed(),
        train=inputs.train.key,
        base=inputs.model.identities if cfg.compare_base else None,
        token=inputs.token,
        class_name=inputs.class_name,
        resolution=inputs.resolution,
    )


def validation_view(cfg: GenerateSection) -> GenerateSection:
    """What a best pick scores: the validation prompts x seeds, rendered from the final weights as from every kept
    step (the same images it would render for them as checkpoints), no base model."""
    seeds = cfg.validation_seeds or cfg.seeds[:1]
    update = {"prompts": cfg.validation_prompts, "seeds": seeds, "validation_seeds": seeds, "compare_base": False}
    return cfg.model_copy(update=update)


def weights_sources(cfg: GenerateSection, inputs: GenerateInputs, training: dict[str, Any]) -> list[Weights]:
    """Every set of weights this config renders from, in table order: final, each sample step, then the base."""
    train, base = inputs.train, inputs.model.path
    final = train.path / WEIGHTS_DIR  # the trained UNet (and text encoder), or the LoRA, worn by the base pipeline
    sources = [Weights("finetuned", "finetuned", training["steps"], f"train:{train.key}", train.key, final,
                       base / "scheduler")]  # fmt: skip
    if cfg.validation_prompts and cfg.seeds:
        for step in training["sample_steps"]:
            folder = train.path / "samples" / f"step-{step:06d}"
            label = f"train:{train.key}@step-{step}"
            sources.append(
                Weights(f"step-{step}", "checkpoint", step, label, [train.key, step], folder, base / "scheduler")
            )
    if cfg.compare_base:
        sources.append(
            Weights("base", "base", 0, f"base:{inputs.model.id}", inputs.model.identities, None, base / "scheduler")
        )
    return sources


def rendering_scheduler(cfg: GenerateSection, weights: Weights) -> dict[str, Any]:
    """The settings of the scheduler `make_scheduler` gives this pipeline, read without loading it."""
    try:
        return planned_scheduler(cfg.scheduler, weights.scheduler_dir)
    except ValueError as err:
        raise StageError(STAGE, f"{err}; set generate.scheduler", item="generate.scheduler") from err


def item_settings(cfg: GenerateSection) -> dict[str, Any]:
    """The generate settings one image depends on: not the prompt list, the seed list or the batch size."""
    return image_settings(cfg)


def item_key(cfg: GenerateSection, weights: Weights, scheduler: dict[str, Any], request: RenderRequest) -> str:
    """An image's key: its weights' identity and every setting that changes its pixels."""
    return stage_key(
        ITEMS,
        CODE_VERSION,
        item_settings(cfg),
        weights=weights.identity,
        prompt=request.prompt,
        seed=request.seed,
        scheduler_config=scheduler,
        size=[request.width, request.height],
    )


def plan(cfg: GenerateSection, inputs: GenerateInputs, training: dict[str, Any]) -> list[Item]:
    """Every image of this config, once each (templates that fill to the same prompt share their images)."""
    side = cfg.size or inputs.resolution

    def items(weights: Weights, templates: tuple[str, ...], seeds: tuple[int, ...]) -> list[Item]:
        scheduler = rendering_scheduler(cfg, weights)
        found = []
        for template in templates:
            prompt = fill_prompt(template, inputs.token, inputs.class_name)
            for seed in seeds:
                request = RenderRequest(prompt, cfg.negative_prompt, seed, cfg.steps, cfg.guidance, side, side)
                found.append(Item(weights, template, request, item_key(cfg, weights, scheduler, request)))
        return found

    planned: dict[str, Item] = {}
    for weights in weights_sources(cfg, inputs, training):
        if weights.kind == "checkpoint":
            found = items(weights, cfg.validation_prompts, cfg.validation_seeds or cfg.seeds[:1])
        else:
            found = items(weights, cfg.prompts, cfg.seeds)
        for item in found:
            planned.setdefault(item.key, item)
    return list(planned.values())


def png_text(item: Item, scheduler: str) -> dict[str, str]:
    """What the PNG says about itself, so a file copied out of the run still tells how it was made."""
    r = item.request
    return {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": str(r.seed),
        "steps": str(r.steps),
        "guidance": str(r.guidance),
        "scheduler": scheduler,
        "size": f"{r.width}x{r.height}",
        "model": item.weights.label,
        "kind": item.weights.kind,
        "step": str(item.weights.step),
    }


# Sets render base first, then each sample step, then the final weights: each swap replaces everything an earlier
# swap replaced (a LoRA the LoRA before; a sample step the UNet and, when trained, the text encoder; the final model
# those and the VAE), so the base pipeline is never restored.
RENDER_ORDER = {"base": 0, "checkpoint": 1, "finetuned": 2}
DAMAGED = "the train output is damaged; delete it and rerun the train stage"


@contextmanager
def _loading(what: str, where: Path, hint: str, item: Item) -> Iterator[None]:
    """A failed load as a StageError naming what was loaded, from where, and the first image that needed it."""
    try:
        yield
    except Exception as err:
        message = f"cannot load {what} from {where} ({type(err).__name__}: {err}); {hint}"
        raise StageError(STAGE, message, item=item.name) from err


@dataclass
class SharedPipeline:
    """The one pipeline the stage renders with: the base, loaded on first use, wearing each set of weights in turn
    (see RENDER_ORDER). `loads` names each load in order (the summary's models_loaded): the base pipeline once, then
    each swap. It renders without a safety checker, as class images are rendered, whatever the export keeps."""

    cfg: GenerateSection
    model: ResolvedModel
    method: str
    pipe: DiffusionPipeline | None = None
    loads: list[str] = field(default_factory=list)

    def wearing(self, weights: Weights, first: Item) -> DiffusionPipeline:
        """The pipeline with these weights and the scheduler they render with (a fresh one per set)."""
        cfg, dtype = self.cfg, getattr(torch, self.cfg.dtype)
        worn = self.pipe is None and weights.folder is not None and self.method == "full"
        if self.pipe is None:  # a full fine-tune's components load in place of the base's, never both
            with _loading(f"the {weights.name} weights", weights.folder, DAMAGED, first):
                components = saved_components(self.model.path, weights.folder, dtype) if worn else {}
            with _loading("the base pipeline", self.model.path, "check model.id and its files", first):
                self.pipe = load_pipeline_for(self.model, cfg.dtype, cfg.vae_slicing, cfg.vae_tiling, components)
            self.loads.append(f"base pipeline: {self.model.id}")
        if weights.folder is not None and not worn:
            with _loading(f"the {weights.name} weights", weights.folder, DAMAGED, first):
                if self.method == "lora":
                    swap_lora(self.pipe, weights.folder)
                else:
                    swap_components(self.pipe, weights.folder, dtype)
                    prepare(self.pipe, cfg.vae_slicing, cfg.vae_tiling)
        if weights.folder is not None:
            self.loads.append(f"weights: {weights.name}")
        with _loading(f"the {weights.name} scheduler", weights.scheduler_dir, "check its scheduler_config.json", first):
            self.pipe.scheduler = saved_scheduler(weights.scheduler_dir)
            make_scheduler(self.pipe, cfg.scheduler)
        return self.pipe


def _save_item(image: Image.Image, text: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        info = PngInfo()
        for name, value in text.items():
            info.add_text(name, value)
        image.save(folder / "image.png", format="PNG", pnginfo=info)
        return text

    return build


def _render_set(
    cfg: GenerateSection, pipe: DiffusionPipeline, planned: list[Item], missing: list[Item], store: Store
) -> int:
    """Render one set of weights' batches that hold a missing image; returns how many items this call created."""
    by_request = {item.request: item for item in planned}
    needed = [item.request for item in missing]
    created = 0
    try:
        description = f"generate ({planned[0].weights.name})"
        for request, image in render(pipe, list(by_request), cfg.batch_size, description, needed):
            item = by_request[request]
            try:
                build = _save_item(image, png_text(item, cfg.scheduler))
                entry = store.get_or_create(ITEMS, item.key, build, item_settings(cfg))
            except Exception as err:
                raise StageError(STAGE, f"unexpected {type(err).__name__}: {err}", item=item.name) from err
            created += entry.created
    except RenderError as err:
        raise StageError(STAGE, f"rendering failed: {err}", item=by_request[err.requests[0]].name) from err
    return created


def build(cfg: GenerateSection, inputs: GenerateInputs, store: Store, key: str) -> StageResult:
    """Render every prompt x seed (and checkpoint and base images), loading only weights with a missing image."""
    training = read_json(inputs.train.path / "training.json", "train", STAGE)
    items = plan(cfg, inputs, training)
    by_weights: dict[str, list[Item]] = {}
    for item in items:
        by_weights.setdefault(item.weights.name, []).append(item)
    pipeline = SharedPipeline(cfg, inputs.model, training["method"])
    created = 0
    for planned in sorted(by_weights.values(), key=lambda planned: RENDER_ORDER[planned[0].weights.kind]):
        missing = [item for item in planned if store.get(ITEMS, item.key) is None]
        if missing:  # weights whose images are all cached are never loaded
            pipe = pipeline.wearing(missing[0].weights, missing[0])
            created += _render_set(cfg, pipe, planned, missing, store)

    table = pd.DataFrame(
        [
            {
                "id": item.id,
                "kind": item.weights.kind,
                "step": item.weights.step,
                "template": item.template,
                "prompt": item.request.prompt,
                "seed": item.request.seed,
                "model": item.weights.label,
                "image": f"images/{item.id}.png",
            }
            for item in items
        ],
        columns=COLUMNS,
    )

    def write(folder: Path) -> dict[str, Any]:
        (folder / "images").mkdir()
        for item in items:
            link_or_copy(store.path(ITEMS, item.key) / "image.png", folder / "images" / f"{item.id}.png")
        table.to_csv(folder / "samples.csv", index=False)
        return {"items": len(items)}

    entry = store.get_or_create(STAGE, key, write, {**cfg.keyed(), "train": inputs.train.key})
    return StageResult(STAGE, key, entry.path, created, len(items) - created, models_loaded=tuple(pipeline.loads))


stage = Stage(STAGE, "generate", stage_key_for, build, outputs={"samples_dir": "images"})
run = stage.run  # the plain function: cached entry or build
