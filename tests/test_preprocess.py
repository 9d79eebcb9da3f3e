"""The preprocess stage as a plain function: per-item caching, rejections, and the usable-image minimum."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks.core.config import PreprocessSection
from tasks.core.stage import StageError
from tasks.core.store import Store
from tasks.stages import preprocess


def _inputs(folder: Path, min_images: int = 1) -> preprocess.PreprocessInputs:
    return preprocess.PreprocessInputs(folder, preprocess.scan(folder), min_images)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (320 + 16 * i, 300), colour).save(folder / f"{i}.png")
    return folder


def _run(folder: Path, store: Store, **settings):
    cfg = PreprocessSection(**{"resolution": 64, "min_side": 64, **settings})
    return preprocess.run(cfg, _inputs(folder), store)


def test_rerun_is_all_cached_and_one_new_image_costs_one(folder: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "artifacts")
    first = _run(folder, store)
    assert (first.items_processed, first.items_cached, first.status) == (4, 0, "ran")
    images = sorted((first.path / "images").iterdir())
    assert len(images) == 4 and all(Image.open(p).size == (64, 64) for p in images)

    again = _run(folder, store)
    assert (again.items_processed, again.items_cached, again.status, again.key) == (0, 4, "cached", first.key)

    Image.new("RGB", (400, 400), "white").save(folder / "new.png")
    grown = _run(folder, store)
    assert (grown.items_processed, grown.items_cached, grown.status) == (1, 4, "ran")
    assert grown.key != first.key

    resized = _run(folder, store, resolution=128)
    assert (resized.items_processed, resized.items_cached) == (5, 0)


def test_renaming_a_file_reuses_its_item(folder: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "artifacts")
    _run(folder, store)
    (folder / "0.png").rename(folder / "zero renamed.png")
    renamed = _run(folder, store)
    assert (renamed.items_processed, renamed.items_cached) == (0, 4)
    table = pd.read_csv(renamed.path / "items.csv")
    assert "zero renamed.png" in set(table["source"])


def test_too_few_usable_images_fails_listing_every_rejected_file(folder: Path, tmp_path: Path) -> None:
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (40, 40), "black").save(folder / "tiny.png")
    cfg = PreprocessSection(resolution=64, min_side=64)
    with pytest.raises(StageError) as err:
        preprocess.run(cfg, _inputs(folder, min_images=5), Store(tmp_path / "artifacts"))
    message = str(err.value)
    assert "only 4 usable images" in message and "broken.jpg" in message and "tiny.png" in message
    assert "data.min_images" in message
    assert not list((tmp_path / "artifacts" / "preprocess").glob("*"))


def test_sources_are_never_changed(folder: Path, tmp_path: Path) -> None:
    def hashes() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    before = hashes()
    _run(folder, Store(tmp_path / "artifacts"))
    assert hashes() == before


def test_missing_instance_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"data\.instance_dir"):
        preprocess.scan(tmp_path / "nope")


def test_a_file_name_that_is_not_utf8_is_rejected_with_a_reason(folder: Path, tmp_path: Path) -> None:
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:  # Latin-1 name, as old zips make
        Image.new("RGB", (300, 300), "white").save(f, format="PNG")
    result = _run(folder, Store(tmp_path / "artifacts"))
    table = pd.read_csv(result.path / "items.csv")
    row = table[table["status"] == "rejected"].iloc[0]
    assert row["source"] == "caf\\xe9.png" and "not valid UTF-8" in row["reason"]
    assert (result.items_processed, result.items_rejected) == (4, 1)
