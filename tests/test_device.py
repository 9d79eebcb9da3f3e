"""Memory hygiene in the flow process: no model a stage loaded outlives the stage, so the training child that
follows has the accelerator to itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.core.config import LatentsSection, PreprocessSection, PriorSection
from tasks.core.store import Store
from tasks.sd import device
from tasks.sd.models import resolve
from tasks.stages import class_images, latents, preprocess


def test_no_model_stays_resident_after_the_class_images_and_latents_stages(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((80, 80, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    store = Store(tmp_path / "artifacts")
    model = resolve("tiny-sd15", "", store.root)
    loads = device.loads()

    classes = class_images.run(
        PriorSection(enabled=True, num_images=2, steps=2), class_images.ClassImagesInputs(model, "a toy", 64), store
    )
    done = preprocess.run(
        PreprocessSection(resolution=64, min_side=64),
        preprocess.PreprocessInputs(images, preprocess.scan(images), 1),
        store,
    )
    encoded = latents.run(LatentsSection(), latents.LatentsInputs(model, done, classes), store)
    device.release()  # what the flow does after every stage

    assert (classes.items_processed, encoded.items_processed) == (2, 5)
    assert device.loads() - loads == 2  # the class-image pipeline and the VAE, each registered when loaded
    assert device.resident() == []  # ... and both gone once their stage returned
