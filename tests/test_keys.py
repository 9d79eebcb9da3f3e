"""Which stage keys each setting changes: exactly the stages whose outputs it can change, and no folder path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tasks import preprocess
from tasks.config import RunConfig, load_config


def stage_keys(config: RunConfig) -> dict[str, str]:
    files = preprocess.scan(config.data.instance_dir)
    inputs = preprocess.PreprocessInputs(config.data.instance_dir, files, config.data.min_images)
    return {"preprocess": preprocess.stage_key_for(config.preprocess, inputs)}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "instance"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (300 + 10 * i, 280), colour).save(folder / ("sub" if i else "") / f"img{i}.png")
    return folder


CHANGES = [
    ("model.id", "tiny-sdxl", set()),
    ("run.name", "other", set()),
    ("data.token", "zwx", set()),
    ("data.class_name", "dog", set()),
    ("data.instance_prompt", "a {token}", set()),
    ("data.min_images", 2, {"preprocess"}),
    ("preprocess.resolution", 256, {"preprocess"}),
    ("preprocess.crop", "face", {"preprocess"}),
    ("preprocess.min_side", 100, {"preprocess"}),
    ("preprocess.max_pixels", 1_000_000, {"preprocess"}),
    ("preprocess.face_margin", 0.3, {"preprocess"}),
]


def test_every_setting_is_in_the_table() -> None:
    fields = {f"{s}.{f}" for s, m in RunConfig.model_fields.items() for f in m.annotation.model_fields}
    assert fields - {"run.artifacts_root", "data.instance_dir"} == {name for name, _, _ in CHANGES}


@pytest.mark.parametrize(("setting", "value", "changed"), CHANGES, ids=[c[0] for c in CHANGES])
def test_setting_changes_exactly_these_stage_keys(images: Path, setting: str, value, changed: set[str]) -> None:
    base = load_config(None, [f"data.instance_dir='{images}'"])
    literal = f"'{value}'" if isinstance(value, str) else value
    other = load_config(None, [f"data.instance_dir='{images}'", f"{setting}={literal}"])
    before, after = stage_keys(base), stage_keys(other)
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_moving_the_folder_or_the_artifact_root_changes_no_key(images: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(images, tmp_path / "elsewhere" / "renamed folder")
    base = load_config(None, [f"data.instance_dir='{images}'"], artifacts=tmp_path / "a")
    other = load_config(None, [f"data.instance_dir='{moved}'"], artifacts=tmp_path / "b")
    assert stage_keys(base) == stage_keys(other)


def test_dataset_content_changes_the_preprocess_key(images: Path) -> None:
    config = load_config(None, [f"data.instance_dir='{images}'"])
    before = stage_keys(config)
    Image.new("RGB", (300, 300), "white").save(images / "new.png")
    assert stage_keys(config)["preprocess"] != before["preprocess"]
