"""The class_images stage as a plain function: per-image caching by content settings, never by count or dataset."""

from __future__ import annotations

import io
import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.core.config import PriorSection
from tasks.core.stage import StageError, StageResult
from tasks.core.store import Store
from tasks.sd.models import ResolvedModel, resolve
from tasks.stages import class_images
from tasks.stages.class_images import ClassImagesInputs

PROMPT = "a photo of dog"
FAST = {"steps": 2, "num_images": 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    return resolve("tiny-sd15", "", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def broken(model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    """The same model identities, but a folder whose UNet weights cannot be loaded: any load fails loudly."""
    folder = tmp_path_factory.mktemp("broken") / "tiny-sd15"
    shutil.copytree(model.path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return replace(model, path=folder, vae_path=folder / "vae")


def _run(store: Store, model: ResolvedModel, prompt: str = PROMPT, resolution: int = 64, **settings) -> StageResult:
    cfg = PriorSection(**{**FAST, **settings})
    return class_images.run(cfg, ClassImagesInputs(model, prompt, resolution), store)


def _images(result: StageResult) -> dict[int, bytes]:
    table = pd.read_csv(result.path / "items.csv")
    return {int(r.index): (result.path / r.image).read_bytes() for r in table.itertuples()}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def test_rerun_loads_no_model_and_more_images_render_only_the_new_ones(
    model: ResolvedModel, broken: ResolvedModel, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    first = _run(store, model)
    assert (first.items_processed, first.items_cached, first.status) == (4, 0, "ran")
    table = pd.read_csv(first.path / "items.csv")
    assert list(table.columns) == ["id", "index", "seed", "prompt", "status", "image"]
    assert list(table["index"]) == [0, 1, 2, 3] and set(table["status"]) == {"ok"}
    assert list(table["seed"]) == [class_images.class_seed(0, i) for i in range(4)]
    assert list(table["image"]) == [f"images/{i}.png" for i in table["id"]]
    pixels = [_pixels(data) for data in _images(first).values()]
    assert {p.shape for p in pixels} == {(64, 64, 3)}
    assert min(np.abs(a - b).mean() for i, a in enumerate(pixels) for b in pixels[i + 1 :]) > 10  # 4 distinct images

    # The broken folder has the same identities: a run that needed the model would fail to load it.
    again = _run(store, broken)
    assert (again.items_processed, again.items_cached, again.status, again.key) == (0, 4, "cached", first.key)
    fewer = _run(store, broken, num_images=3)  # a new stage entry, every item cached: still no model load
    assert (fewer.items_processed, fewer.items_cached, fewer.status) == (0, 3, "ran")
    with pytest.raises(StageError, match="cannot load the base model") as err:
        _run(store, broken, num_images=6)
    assert err.value.stage == "class_images" and err.value.item == str(broken.path)

    more = _run(store, model, num_images=6)
    assert (more.items_processed, more.items_cached, more.status) == (2, 4, "ran")
    before, after = _images(first), _images(more)
    assert all(after[i] == before[i] for i in range(4))
    assert len(set(after.values())) == 6
    cfg = PriorSection(**FAST)
    item = class_images.item_key(
        cfg, ClassImagesInputs(model, PROMPT, 64), class_images.rendering_scheduler(cfg, model), 5
    )
    linked = pd.read_csv(more.path / "items.csv")["image"][5]
    assert (more.path / linked).samefile(store.path(class_images.ITEMS, item) / "image.png")  # hard links, no copies


@pytest.fixture(scope="module")
def baseline(model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, StageResult]:
    """One store holding 2 class images with the default settings, shared by the tests that change one thing."""
    store = Store(tmp_path_factory.mktemp("artifacts"))
    return store, _run(store, model, num_images=2)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a photo of cat"},
        {"negative_prompt": "blurry"},
        {"steps": 3},
        {"guidance": 5.0},
        {"seed": 1},
        {"scheduler": "EulerDiscreteScheduler"},
        {"resolution": 80},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_setting_that_shapes_the_pixels_makes_new_items(
    baseline: tuple[Store, StageResult], model: ResolvedModel, change: dict[str, object]
) -> None:
    store, base = baseline
    changed = _run(store, model, num_images=2, **change)
    assert (changed.items_processed, changed.items_cached, changed.status) == (2, 0, "ran")
    assert changed.key != base.key
    old, new = _images(base), _images(changed)
    for i in range(2):
        a, b = _pixels(old[i]), _pixels(new[i])
        assert a.shape != b.shape or np.abs(a - b).mean() > 0.5


def test_other_runs_and_datasets_of_the_same_class_reuse_the_images(
    baseline: tuple[Store, StageResult], model: ResolvedModel, tmp_path: Path
) -> None:
    store, base = baseline
    # Nothing dataset-related can reach a key: the stage's inputs are the model, the class prompt and the size.
    assert [f.name for f in fields(ClassImagesInputs)] == ["model", "class_prompt", "resolution"]
    # Training-only settings, the batch size and the model's folder are not part of any key.
    moved = resolve(str(shutil.copytree(model.path, tmp_path / "elsewhere")), "", tmp_path)
    same = _run(store, moved, num_images=2, enabled=True, loss_weight=0.5, batch_size=1)
    assert (same.items_processed, same.items_cached, same.status, same.key) == (0, 2, "cached", base.key)
    # Another run's template that formats to the same class prompt: a new stage entry, the same items.
    other = _run(store, model, num_images=2, class_prompt="a photo of dog")
    assert (other.items_processed, other.items_cached, other.status) == (0, 2, "ran")
    assert other.key != base.key
    assert [_images(other)[i] for i in range(2)] == [_images(base)[i] for i in range(2)]


def test_batch_size_does_not_change_the_images(
    baseline: tuple[Store, StageResult], model: ResolvedModel, tmp_path: Path
) -> None:
    _, base = baseline
    alone = _run(Store(tmp_path / "artifacts"), model, num_images=2, batch_size=1)
    assert alone.key == base.key
    for i, data in _images(alone).items():
        a, b = _pixels(data), _pixels(_images(base)[i])
        assert np.abs(a - b).max() <= 1


def test_a_rendering_failure_names_the_image_and_commits_nothing(model: ResolvedModel, tmp_path: Path) -> None:
    store = Store(tmp_path / "artifacts")
    with pytest.raises(StageError, match="divisible by 8") as err:
        _run(store, model, resolution=60)
    assert (err.value.stage, err.value.item) == ("class_images", "class image 0")
    assert not (tmp_path / "artifacts" / class_images.STAGE).exists()
    unknown = PriorSection(**FAST).model_copy(update={"scheduler": "Nope"})  # as the Python API can pass it
    with pytest.raises(StageError, match="not a diffusers scheduler") as err:
        class_images.run(unknown, ClassImagesInputs(model, PROMPT, 64), store)
    assert err.value.item == "prior.scheduler"


def test_seeds_are_stable_distinct_63_bit_numbers() -> None:
    seeds = [class_images.class_seed(0, i) for i in range(1000)] + [class_images.class_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert (class_images.class_seed(0, 0), class_images.class_seed(0, 1)) == (4703370226686496824, 3620348604697588169)
