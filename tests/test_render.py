"""The batched renderer: an image depends only on its request (not its batch), on both presets and any scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from tasks.core.config import Scheduler
from tasks.sd import render
from tasks.sd.models import ResolvedModel, resolve
from tasks.sd.render import RenderRequest

PROMPT = "a photo of dog"
STEPS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResolvedModel]:
    root = tmp_path_factory.mktemp("render")
    return {name: resolve(name, "", root) for name in ("tiny-sd15", "tiny-sdxl")}


def _pipe(model: ResolvedModel, scheduler: str | None = None) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model.path)
    if scheduler:
        render.make_scheduler(pipe, scheduler)
    return pipe


def _request(seed: int, prompt: str = PROMPT, negative: str = "", **size: int) -> RenderRequest:
    return RenderRequest(prompt, negative, seed, STEPS, 7.5, size.get("width", 64), size.get("height", 64))


def _pixels(pipe: DiffusionPipeline, requests: list[RenderRequest], batch_size: int) -> dict[RenderRequest, np.ndarray]:
    return {r: np.asarray(image).astype(np.int16) for r, image in render.render(pipe, requests, batch_size, "test")}


def _spy_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every pipeline call the renderer makes."""
    sizes: list[int] = []
    original = render._render_batch

    def spy(pipe: DiffusionPipeline, batch: tuple[RenderRequest, ...]):
        sizes.append(len(batch))
        return original(pipe, batch)

    monkeypatch.setattr(render, "_render_batch", spy)
    return sizes


@pytest.mark.parametrize(
    ("preset", "scheduler", "negative"),
    [
        ("tiny-sd15", None, ""),
        ("tiny-sd15", "EulerAncestralDiscreteScheduler", "blurry"),  # stochastic steps draw from each generator too
        ("tiny-sdxl", None, ""),
        ("tiny-sdxl", "DPMSolverMultistepScheduler", "blurry"),
    ],
)
def test_an_image_is_the_same_alone_and_inside_a_batch(
    models: dict[str, ResolvedModel], monkeypatch: pytest.MonkeyPatch, preset: str, scheduler: str | None, negative: str
) -> None:
    pipe = _pipe(models[preset], scheduler)
    sizes = _spy_batches(monkeypatch)
    target = _request(7, negative=negative)
    alone = _pixels(pipe, [target], batch_size=1)[target]
    others = [_request(seed, prompt, negative) for seed, prompt in [(1, "a cat"), (2, "a toy"), (3, PROMPT)]]
    batch = _pixels(pipe, [others[0], target, *others[1:]], batch_size=4)
    assert sizes == [1, 4]
    assert alone.shape == (64, 64, 3)
    assert np.abs(batch[target] - alone).max() <= 1  # CPU kernels may round differently per batch size
    different_seed = batch[others[2]]  # same prompt, seed 3 instead of 7
    assert np.abs(different_seed - alone).mean() > 10


def test_requests_group_by_settings_and_come_back_once_each(
    models: dict[str, ResolvedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _pipe(models["tiny-sd15"])
    sizes = _spy_batches(monkeypatch)
    wide = [_request(seed, width=96, height=64) for seed in (1, 2, 3)]
    square = [_request(seed) for seed in (4, 5)]
    negative = [_request(6, negative="blurry")]
    mixed = [wide[0], square[0], wide[1], negative[0], square[1], wide[2]]
    images = _pixels(pipe, mixed, batch_size=2)
    assert sorted(images, key=mixed.index) == mixed
    assert sizes == [2, 1, 2, 1]  # wide x3 in 2+1, square x2, negative x1
    assert {images[r].shape for r in wide} == {(64, 96, 3)}
    alone = _pixels(pipe, [wide[2]], batch_size=1)[wide[2]]
    assert np.abs(images[wide[2]] - alone).max() <= 1


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_make_scheduler_swaps_the_class_and_keeps_the_base_config(models: dict[str, ResolvedModel], name: str) -> None:
    pipe = _pipe(models["tiny-sd15"])
    base = dict(pipe.scheduler.config)
    scheduler = render.make_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == name and scheduler is pipe.scheduler
    for field in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type", "timestep_spacing"):
        assert scheduler.config[field] == base[field]
    pipe_fresh = _pipe(models["tiny-sd15"])
    default = _pixels(pipe_fresh, [_request(0)], 1)
    swapped = _pixels(pipe, [_request(0)], 1)
    assert np.abs(swapped[_request(0)] - default[_request(0)]).mean() > 1  # the sampler really changed


def test_the_config_offers_the_samplers_sd_pipelines_list_as_compatible() -> None:
    """The config names them without importing diffusers; this keeps the list in step with the installed diffusers."""
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    offered = set(get_args(Scheduler))
    left_out = {"LMSDiscreteScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler"}
    assert offered == {s.name for s in KarrasDiffusionSchedulers} - left_out
    assert all(render.scheduler_class(name).__name__ == name for name in offered)


@pytest.mark.parametrize("name", ["NoSuchScheduler", "AutoencoderKL"])
def test_unknown_scheduler_names_are_refused(models: dict[str, ResolvedModel], name: str) -> None:
    pipe = _pipe(models["tiny-sd15"])
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        render.make_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_a_failing_batch_names_its_requests(models: dict[str, ResolvedModel]) -> None:
    pipe = _pipe(models["tiny-sd15"])
    bad = [_request(1, width=60, height=60), _request(2, width=60, height=60)]
    with pytest.raises(render.RenderError, match="divisible by 8") as err:
        list(render.render(pipe, bad, 4, "test"))
    assert err.value.requests == tuple(bad)


def test_a_separate_vae_replaces_the_bases(models: dict[str, ResolvedModel], tmp_path: Path) -> None:
    base = models["tiny-sd15"]
    vae = AutoencoderKL.from_pretrained(base.vae_path)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    vae.save_pretrained(tmp_path / "vae-fix")
    model = resolve(str(base.path), str(tmp_path / "vae-fix"), tmp_path)
    assert model.identities["vae"] != base.identities["vae"]
    pipe = render.load_pipeline_for(model, "float32")
    shift = pipe.vae.decoder.conv_out.bias - AutoencoderKL.from_pretrained(base.vae_path).decoder.conv_out.bias
    assert torch.allclose(shift, torch.full_like(shift, 0.5))
    assert pipe.unet.device.type == "cpu" and pipe.unet.dtype == torch.float32


def test_an_image_that_comes_out_nan_is_named_not_saved(models: dict[str, ResolvedModel]) -> None:
    """On CPU the float16 VAE overflow is a constructed case: a NaN in the decoder's last bias."""
    pipe = _pipe(models["tiny-sd15"])
    requests = [_request(0), _request(1)]
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(render.RenderError, match="the image came out NaN or inf") as caught:
        list(render.render(pipe, requests, 2, "test"))
    assert caught.value.requests == (requests[0],)
