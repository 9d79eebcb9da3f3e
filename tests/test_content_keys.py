"""Only content costs: after one run of the whole flow, a rename, a rejected file or a setting that moves no pixel
reruns nothing below preprocess, and a changed photo, crop, prompt or caption reruns exactly what it must."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tasks.core.config_load import load_config

REPO = Path(__file__).resolve().parents[1]
BELOW = ("latents", "train", "export", "generate", "evaluate")
QUICK = ["train.steps=3", "train.checkpoint_every=0", "train.sample_every=0", "generate.steps=1", "generate.seeds=[0]",
         "generate.compare_base=false", "data.captions='sidecar'"]  # fmt: skip


def _rename(images: Path) -> None:
    (images / "toy_02_shelf.png").rename(images / "shelf, renamed.png")


def _reject_three(images: Path) -> None:
    Image.new("RGB", (90, 90), "orange").save(images / "too small.png")
    (images / "Thumbs.db").write_bytes(b"\0\1\2" * 100)
    shutil.copy(images / "toy_04_kitchen.jpg", images / "kitchen copy.jpg")


def _rename_captioned(images: Path) -> None:
    (images / "toy_01_park.jpg").rename(images / "park.jpg")
    (images / "toy_01_park.txt").rename(images / "park.txt")


def _rotate(images: Path) -> None:
    photo = images / "toy_03_beach.webp"
    Image.open(photo).rotate(90).save(photo)


def _recaption(images: Path) -> None:
    (images / "park.txt").write_text("a photo of {token} {class} on a bench")


def _nothing(images: Path) -> None:
    return None


# (what changes, the edit to the folder, settings added from then on, the stages that run, images preprocessed and
# encoded). Rows apply in order, each on top of the ones before.
CACHED = {"preprocess": "ran", "report": "ran", **dict.fromkeys(BELOW, "cached")}
RETRAIN = {"preprocess": "cached", "latents": "cached", **dict.fromkeys(BELOW[1:], "ran")}
NEW_PIXELS = {**RETRAIN, "preprocess": "ran", "latents": "ran"}
ROWS: list[tuple[str, Callable[[Path], None], list[str], dict[str, str], tuple[int, int]]] = [
    ("rename a photo", _rename, [], CACHED, (0, 0)),
    ("a too-small image, a non-image file and a duplicate", _reject_three, [], CACHED, (2, 0)),  # two rejected items
    ("data.min_images still satisfied", _nothing, ["data.min_images=4"], CACHED, (0, 0)),
    ("face_margin with the centre crop", _nothing, ["preprocess.face_margin=0.9"], CACHED, (8, 0)),
    ("a min_side that rejects nothing", _nothing, ["preprocess.min_side=200"], CACHED, (8, 0)),
    ("rename a captioned photo and its caption", _rename_captioned, [], CACHED, (0, 0)),
    ("a changed photo", _rotate, [], NEW_PIXELS, (1, 1)),
    # OpenCV finds a face on the toy in five demo photos; the square beach photo is its own crop either way
    ("a crop that moves pixels", _nothing, ["preprocess.crop='face'"], NEW_PIXELS, (8, 5)),
    ("a changed prompt", _nothing, ["data.instance_prompt='a {token} {class}'"], RETRAIN, (0, 0)),
    ("a changed caption", _recaption, [], RETRAIN, (0, 0)),
]


def _run(server: str, images: Path, root: Path, settings: list[str]) -> dict:
    """One run of the flow in this process (as the UI or a deployment starts it), against the suite's server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.dreambooth import dreambooth

    config = load_config(REPO / "configs" / "demo.toml", [f"data.instance_dir='{images}'", *QUICK, *settings], root)
    with temporary_settings({PREFECT_API_URL: server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        return dreambooth(config)


def test_only_content_reruns_stages(prefect_server: str, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    (images / "toy_01_park.txt").write_text("a photo of {token} {class} in a park")
    settings: list[str] = []
    first = _run(prefect_server, images, tmp_path / "a", settings)
    assert first["stages"]["train"]["status"] == "ran" and first["stages"]["preprocess"]["items_processed"] == 6
    training = json.loads((tmp_path / "a" / "train" / first["stages"]["train"]["key"] / "training.json").read_text())
    assert training["captions"] == {"sidecar": 1, "instance prompt": 5}
    page = Path(first["outputs"]["report_html"]).read_text()
    assert "1 images with their .txt caption, 5 with the instance" in page

    failures = []
    for change, edit, added, expected, (preprocessed, encoded) in ROWS:
        edit(images)
        settings += added
        summary = _run(prefect_server, images, tmp_path / "a", settings)
        stages = summary["stages"]
        seen = {stage: stages[stage]["status"] for stage in expected}
        counts = (stages["preprocess"]["items_processed"], stages["latents"]["items_processed"])
        loaded = summary["models_loaded"]
        if seen != expected or counts != (preprocessed, encoded) or (expected == CACHED and loaded):
            failures.append(f"{change}: {seen}, preprocessed and encoded {counts}, loaded {loaded}")
    assert not failures, "\n".join(failures)
