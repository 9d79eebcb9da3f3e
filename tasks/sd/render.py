"""Batched text-to-image rendering for class images and samples: one seeded generator per image.

An image depends only on its own request (prompt, negative prompt, seed, steps, guidance, size), never on the
batch it was rendered in, so cached images stay valid whatever batch size or neighbours a later run uses.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from tasks.core.batching import batched
from tasks.core.progress import track
from tasks.sd.device import device, loaded
from tasks.sd.models import ResolvedModel

if TYPE_CHECKING:  # diffusers is imported where pipelines are built: cached runs never pay for it
    from diffusers import DiffusionPipeline, SchedulerMixin


@dataclass(frozen=True)
class RenderRequest:
    """One image to render. An empty negative prompt means none: the pipeline's own default applies."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int


class RenderError(Exception):
    """The pipeline failed on a batch, or gave an image that is not finite; `requests` are the images concerned,
    for the caller to name."""

    def __init__(self, requests: tuple[RenderRequest, ...], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.requests = requests
        self.cause = cause


RENDERING_OPTIONS = ("dtype", "vae_slicing", "vae_tiling")  # each can move a pixel by a level


def image_settings(section: Any) -> dict[str, Any]:
    """The settings of a rendering section (prior or generate) that shape each image's pixels: the sampler's and
    those rendering options the section has."""
    options = {name: getattr(section, name) for name in RENDERING_OPTIONS if name in type(section).model_fields}
    return {
        "negative_prompt": section.negative_prompt,
        "scheduler": section.scheduler,
        "steps": section.steps,
        "guidance": section.guidance,
        **options,
    }


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called `name`, e.g. DPMSolverMultistepScheduler."""
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise ValueError(
            f"{name!r} is not a diffusers scheduler; use a class name such as "
            "DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler or DDIMScheduler"
        )
    return found


def build_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """Scheduler `name` built from a base model's scheduler config (its betas, timestep spacing, prediction type)."""
    return scheduler_class(name).from_config(dict(base_config))


def scheduler_settings(scheduler: SchedulerMixin) -> dict[str, Any]:
    """The settings that shape a scheduler's samples, as JSON-able values for cache keys (no version stamps)."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def make_scheduler(pipe: DiffusionPipeline, name: str) -> SchedulerMixin:
    """Swap the pipeline's scheduler for `name`, configured from the scheduler it had."""
    pipe.scheduler = build_scheduler(name, pipe.scheduler.config)
    return pipe.scheduler


def saved_scheduler(scheduler_dir: Path) -> SchedulerMixin:
    """The scheduler in `scheduler_dir` of a pipeline folder, as loading that pipeline gives it: of the class its
    model_index.json names, configured from the folder."""
    _, name = json.loads((scheduler_dir.parent / "model_index.json").read_text())[scheduler_dir.name]
    return scheduler_class(name).from_pretrained(scheduler_dir)


def planned_scheduler(name: str, scheduler_dir: Path) -> dict[str, Any]:
    """The settings of the scheduler `make_scheduler` will give a pipeline whose scheduler config is in
    `scheduler_dir`, read without loading the pipeline (ValueError for an unknown scheduler)."""
    return scheduler_settings(build_scheduler(name, scheduler_class(name).load_config(scheduler_dir)))


def load_pipeline_for(
    model: ResolvedModel,
    dtype: str,
    vae_slicing: bool = True,
    vae_tiling: bool = False,
    components: dict[str, Any] | None = None,
) -> DiffusionPipeline:
    """The base pipeline with the model's own VAE (a separate one when configured), on the accelerator in `dtype`;
    `components` (loaded already, e.g. a fine-tune's UNet) take the place of the base's, which are never loaded.

    Cache keys hash `model.identities`, whose "vae" is the separate VAE when one is set, so rendering must use it.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    # SD 1.5's safety checker blacks out flagged images; a black class image would be cached as prior data
    # (diffusers' DreamBooth script renders class images without it too).
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if model.family == "sd15" else {}
    given = {**no_checker, **(components or {})}
    pipe = DiffusionPipeline.from_pretrained(model.path, dtype=getattr(torch, dtype), **given)
    if model.vae_path != model.path / "vae":
        pipe.vae = diffusers.AutoencoderKL.from_pretrained(model.vae_path, dtype=getattr(torch, dtype))
    return prepare(pipe, vae_slicing, vae_tiling)


def prepare(pipe: DiffusionPipeline, vae_slicing: bool, vae_tiling: bool) -> DiffusionPipeline:
    """On the accelerator, registered as loaded; with `vae_slicing` the VAE decodes one image at a time (a batch's
    decode memory divided by its size; a batched decode can round a pixel differently), with `vae_tiling` tile by
    tile."""
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    return loaded(pipe.to(device()))


def _group_key(request: RenderRequest) -> tuple[int, float, int, int, bool]:
    """Requests that can share one pipeline call: same steps, guidance, size, and negative prompt or none."""
    return (request.steps, request.guidance, request.width, request.height, request.negative_prompt == "")


def _batches(requests: Sequence[RenderRequest], batch_size: int) -> Iterator[tuple[RenderRequest, ...]]:
    """Batches of at most `batch_size` compatible requests, groups in order of first appearance."""
    groups: dict[tuple[int, float, int, int, bool], list[RenderRequest]] = {}
    for request in requests:
        groups.setdefault(_group_key(request), []).append(request)
    for group in groups.values():
        yield from (tuple(batch) for batch in batched(group, batch_size))


def _render_batch(pipe: DiffusionPipeline, batch: tuple[RenderRequest, ...]) -> list[Image.Image]:
    first = batch[0]
    # SDXL zeroes the unconditional embedding only for negative_prompt=None; "" would encode the empty text.
    negative = None if first.negative_prompt == "" else [r.negative_prompt for r in batch]
    output = pipe(
        prompt=[r.prompt for r in batch],
        negative_prompt=negative,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        width=first.width,
        height=first.height,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch],
        output_type="np",  # floats, where a NaN still shows; turned into 8-bit images exactly as "pil" does
    )
    for request, image in zip(batch, output.images, strict=True):
        if not np.isfinite(image).all():
            cause = ValueError(
                "the image came out NaN or inf (a float16 VAE can overflow: render in float32, or use a VAE made "
                "for float16 such as madebyollin/sdxl-vae-fp16-fix)"
            )
            raise RenderError((request,), cause)
    return pipe.image_processor.numpy_to_pil(output.images)


def render(
    pipe: DiffusionPipeline,
    requests: Sequence[RenderRequest],
    batch_size: int,
    description: str,
    needed: Collection[RenderRequest] | None = None,
) -> Iterator[tuple[RenderRequest, Image.Image]]:
    """Render every request, `batch_size` at a time; yields (request, image) as each batch completes.

    Each image gets its own CPU generator seeded with its request's seed, so its content does not depend on its
    batch; its last bits do (a batched matmul rounds by its batch's shape). So with `needed`, `requests` is the whole
    plan and only the batches holding a needed request are rendered, whole: a stage resumed after a kill renders
    exactly the batches an uninterrupted one does, and its images are the same to the byte.
    Requests are grouped by steps, guidance and size, so the order may differ from `requests`. A pipeline
    failure raises `RenderError` naming the batch.
    """
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole job, from track()
    wanted = None if needed is None else set(needed)
    batches = [b for b in _batches(requests, batch_size) if wanted is None or not wanted.isdisjoint(b)]

    def images() -> Iterator[tuple[RenderRequest, Image.Image]]:
        for batch in batches:
            try:
                rendered = _render_batch(pipe, batch)
            except RenderError:
                raise
            except Exception as err:
                raise RenderError(batch, err) from err
            yield from zip(batch, rendered, strict=True)

    yield from track(images(), sum(map(len, batches)), description)
