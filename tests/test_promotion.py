"""The promotion gate's arithmetic; a published model that a reader never sees in part, however often a new one
replaces it; and three toy nights: the first model published, a worse one kept, a better one published."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect_api import client_for

from tasks.stages import promotion
from tasks.stages.promotion import Promotion, gate, publish

REPO = Path(__file__).resolve().parents[1]
FILES = {"model_index.json": 1, "unet/diffusion_pytorch_model.safetensors": 400_000, "vae/config.json": 1}


def _model(folder: Path, fill: int) -> Path:
    for name, size in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes([fill]) * size)
    return folder


def test_the_gate_publishes_the_first_model_and_then_only_one_no_worse_than_the_published_by_the_tolerance() -> None:
    published = {"scores": {"subject": 0.6, "dino": None}}
    assert gate("analyser", 0.05, 0.1, None) == Promotion(True, "analyser", 0.1, None, "the subject's first model")
    assert gate("analyser", 0.05, 0.55, published).published  # 0.55 >= 0.6 - 0.05
    kept = gate("analyser", 0.05, 0.54, published)
    assert (kept.published, kept.score, kept.before) == (False, 0.54, 0.6)
    assert kept.why == "analyser 0.54 < 0.6 - 0.05: kept, not published"
    assert not gate("analyser", 0.05, None, published).published  # no score tonight: the published model stays
    assert gate("dino", 0.0, 0.1, published).published  # the published model has no dino score
    assert gate("", 0.0, None, published).published  # no gate


def test_a_reader_never_sees_part_of_a_model_while_new_ones_are_published(tmp_path: Path) -> None:
    models = [_model(tmp_path / f"model{fill}", fill) for fill in (1, 2)]
    passed = Promotion(True, "", None, None, "no gate")
    publish(tmp_path / "root", "rex", models[0], {"model_dir": str(models[0])}, passed)
    done, seen, expected = threading.Event(), [], {*FILES, promotion.RECORD}

    def publish_again() -> None:
        try:
            for turn in range(30):
                model = models[turn % 2]
                publish(tmp_path / "root", "rex", model, {"model_dir": str(model)}, passed)
        finally:
            done.set()

    writer = threading.Thread(target=publish_again)
    writer.start()
    folder = promotion.folder(tmp_path / "root", "rex")
    while not done.is_set():
        version = folder.resolve()  # a reader resolves the link once, then reads one version
        files = {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()}
        record = json.loads((version / promotion.RECORD).read_text())
        fill = (version / "vae" / "config.json").read_bytes()
        seen.append((files, Path(record["model_dir"]).name, fill))
    writer.join()
    assert len(seen) > 30 and all(files == expected for files, _, _ in seen), seen[:3]
    assert all(name == f"model{fill[0]}" for _, name, fill in seen)  # the record and the files are one version
    assert {name for _, name, _ in seen} == {"model1", "model2"}

    versions = tmp_path / "root" / promotion.PUBLISHED / promotion.VERSIONS
    assert len(list(versions.iterdir())) == 31  # replaced minutes ago: a reader may still be in one
    for version in versions.iterdir():  # as if published two hours ago
        version.rename(version.with_name(f"rex-{int(version.name.split('-')[1]) - 7200 * 10**9}"))
    publish(tmp_path / "root", "rex", models[0], {"model_dir": str(models[0])}, passed)
    assert len(list(versions.iterdir())) == 2  # the published one and the one it replaced just now
    assert promotion.forget(tmp_path / "root", "rex") and not folder.exists() and not folder.is_symlink()
    assert not list(versions.iterdir())


def _night(boothflow, folder: Path, root: Path, summary: Path, *settings: str) -> dict:
    every = [*NIGHT, *settings]
    boothflow("subjects", folder, "--config", "toy", "--artifacts", root, "--summary", summary,
              *(arg for setting in every for arg in ("--set", setting)))  # fmt: skip
    [row] = json.loads(summary.read_text())["subjects"]
    return row


# The toy night: the analyser's subject rate on the 64 seeds of the instance prompt the toy DreamBooth test renders
# (so night 3's samples are its, from the shared store) gates the model.
NIGHT = ["generate.prompts=['a photo of {token} {class}']", "generate.compare_base=false",
         "publish.metric='analyser'", "publish.tolerance=0.05", "data.settle_minutes=0"]  # fmt: skip
SHORT = ["train.sample_every=0", "train.checkpoint_every=0"]


def _train_keys(root: Path, folder: Path) -> set[str]:
    """The train keys of the runs that trained from `folder`, as their summaries recorded them."""
    summaries = [json.loads(path.read_text()) for path in (root / "runs").glob("*/summary.json")]
    mine = [s for s in summaries if Path(s["run"].get("instance_dir") or "/").resolve() == folder.resolve()]
    return {s["stages"]["train"]["key"] for s in mine if s["stages"].get("train", {}).get("key")}


def _gc_would_remove(boothflow, root: Path) -> str:
    """`cache gc --keep-nights 1 --dry-run`: the store is shared with other tests, so nothing is removed here."""
    return boothflow("cache", "gc", "--keep-nights", "1", "--dry-run", "--artifacts", root).stdout


def test_a_worse_night_keeps_the_published_model_and_a_better_one_replaces_it(
    boothflow, prefect_server: str, toy_root: Path, tmp_path: Path
) -> None:
    """Night 1 trains 300 steps (published: the first model; subject rate 10 of 64 here), night 2 two steps (0 of
    64: worse by more than the tolerance, kept), night 3 the shipped 400 steps (18 of 64: published; its training is
    the toy DreamBooth test's, from the shared toy store). Each margin is at least 6 images of 64."""
    folder = tmp_path / "subjects"
    shutil.copytree(REPO / "data" / "toy", folder / "rex")
    published = promotion.folder(toy_root, "rex")

    first = _night(boothflow, folder, toy_root, tmp_path / "1.json", "train.steps=300", *SHORT)
    assert first["promotion"]["published"] and first["promotion"]["why"] == "the subject's first model", first
    record = json.loads((published / promotion.RECORD).read_text())
    assert (published / "model_index.json").is_file() and record["scores"]["subject"] == first["metrics"]["subject"]

    second = _night(boothflow, folder, toy_root, tmp_path / "2.json", "train.steps=2", *SHORT)
    kept = second["promotion"]
    assert not kept["published"] and (kept["score"], kept["before"]) == (second["metrics"]["subject"], first[
        "metrics"]["subject"]), kept  # fmt: skip
    assert kept["score"] < kept["before"] - 0.05 and kept["why"].endswith("kept, not published")
    assert json.loads((published / promotion.RECORD).read_text())["model_dir"] == record["model_dir"]
    page = Path(json.loads((tmp_path / "2.json").read_text())["summary"]).read_text()
    assert f"kept: analyser {kept['score']:.4g} &lt; {kept['before']:.4g} - 0.05" in page
    [night_2_train] = _train_keys(toy_root, folder / "rex") - {record["keys"]["train"]}
    would = _gc_would_remove(boothflow, toy_root)  # night 1: not the last night, but published; night 2: the last
    assert f"train/{record['keys']['train']}" not in would and f"train/{night_2_train}" not in would, would

    third = _night(boothflow, folder, toy_root, tmp_path / "3.json")
    assert third["promotion"]["published"] and third["metrics"]["subject"] > first["metrics"]["subject"], third
    now = json.loads((published / promotion.RECORD).read_text())
    assert now["model_dir"] != record["model_dir"] and now["scores"]["subject"] == third["metrics"]["subject"]
    assert now["keys"]["train"] and now["night"].startswith("night of ")
    would = _gc_would_remove(boothflow, toy_root)  # nights 1 and 2: neither the last night nor published
    for key in (record["keys"]["train"], night_2_train):
        assert f"train/{key} " in would and "not used by its subject's last 1 runs nor published" in would, would
    assert f"train/{now['keys']['train']}" not in would
    with client_for(prefect_server) as client:
        links = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["published-rex"])))
    assert len(links) == 2  # nights 1 and 3
