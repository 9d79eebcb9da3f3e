"""`boothflow forget` on a subjects night of two subjects that share their class images: one subject's entries go,
the other's night is still cached end to end, and the store verifies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.core.store import Store

REPO = Path(__file__).resolve().parents[1]
DEMO = sorted((REPO / "data" / "demo").iterdir())
SETTINGS = ["prior.enabled=true", "prior.num_images=2", "prior.steps=2", "train.steps=2", "train.checkpoint_every=0",
            "train.sample_every=0", "generate.steps=2", "generate.seeds=[0]", "generate.compare_base=false",
            "generate.prompts=['a photo of {token} {class}']", "data.settle_minutes=0"]  # fmt: skip


def _night(boothflow, folder: Path, root: Path, summary: Path) -> dict[str, dict]:
    boothflow("subjects", folder, "--config", "demo", "--artifacts", root, "--summary", summary,
              *(arg for setting in SETTINGS for arg in ("--set", setting)))  # fmt: skip
    return {row["subject"]: row for row in json.loads(summary.read_text())["subjects"]}


def _entries(root: Path) -> set[str]:
    return {f"{entry['stage']}/{entry['key']}" for entry in Store(root).entries()}


def _keys(root: Path, night: Path) -> dict[str, set[str]]:
    """Each subject's stage keys (`stage/key`), from the runs the night records."""
    runs = json.loads(night.read_text())["flow_runs"]
    return {subject: set(json.loads((root / "runs" / run_id / "keys.json").read_text()))
            for subject, run_id in runs.items()}  # fmt: skip


def test_forgetting_a_subject_removes_what_its_photos_made_and_nothing_shared(boothflow, tmp_path: Path) -> None:
    folder, root = tmp_path / "subjects", tmp_path / "artifacts"
    for name, photos in (("ann", DEMO[:3]), ("ben", DEMO[3:])):
        (folder / name).mkdir(parents=True)
        for photo in photos:
            shutil.copy(photo, folder / name / photo.name)
    _night(boothflow, folder, root, tmp_path / "night.json")
    keys = _keys(root, tmp_path / "night.json")
    shared = keys["ann"] & keys["ben"]
    assert {key.split("/")[0] for key in shared} == {"class_images"}  # the same class, the same images
    ann_only = keys["ann"] - shared
    before = _entries(root)
    assert ann_only <= before

    listed = boothflow("forget", "ann", "--subjects", folder, "--artifacts", root, "--dry-run").stdout
    assert _entries(root) == before  # a dry run removes nothing
    done = boothflow("forget", "ann", "--subjects", folder, "--artifacts", root).stdout
    assert listed.replace("would remove", "removed").splitlines()[:-1] == done.splitlines()[:-1]
    after = _entries(root)
    gone = before - after
    assert ann_only <= gone
    assert {entry.split("/")[0] for entry in gone} >= {"preprocess-items", "latents-items", "generate-items"}
    assert keys["ben"] <= after and not any(entry.startswith("class_images") for entry in gone)
    assert str(folder / "ann") in done and f"{len(gone)} entries and 1 runs' records" in done

    shutil.rmtree(folder / "ann")
    again = _night(boothflow, folder, root, tmp_path / "again.json")
    assert {stage["status"] for stage in again["ben"]["stages"]} == {"cached"}
    verified = boothflow("cache", "verify", "--artifacts", root)
    assert "all intact" in verified.stdout

    refused = boothflow("forget", "ann", "--subjects", folder, "--artifacts", root, check=False)
    assert refused.returncode == 2 and "nothing to forget" in refused.stderr and "Traceback" not in refused.stderr
