"""End to end through the `boothflow` CLI against the suite's Prefect server: caching, user folders, broken files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from corpus import USER_EXIF6, build_broken_corpus, build_user_folder
from PIL import Image
from prefect_api import task_states

REPO = Path(__file__).resolve().parents[1]


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _outcomes(summary: dict) -> dict[str, str]:
    table = pd.read_csv(Path(summary["outputs"]["preprocess_dir"]).parent / "items.csv")
    return {row.source: f"{row.status}:{row.reason}" for row in table.itertuples()}


def _matches(outcome: str, expected: str) -> bool:
    status, _, reason = outcome.partition(":")
    kind, _, keyword = expected.partition(":")
    return status == kind and keyword.lower() in reason.lower()


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_rerun_is_cached_in_prefect_and_new_images_cost_only_themselves(
    boothflow, prefect_server: str, tmp_path: Path
) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "my photos")
    base = [
        "--config",
        "configs/demo.toml",
        "--artifacts",
        tmp_path / "artifacts",
        "--set",
        f"data.instance_dir='{images}'",
    ]

    boothflow("stage", "preprocess", *base, "--summary", tmp_path / "1.json")
    first = _summary(tmp_path / "1.json")["stages"]["preprocess"]
    assert (first["status"], first["items_processed"], first["items_cached"], first["items_rejected"]) == (
        "ran",
        6,
        0,
        0,
    )

    proc = boothflow("stage", "preprocess", *base, "--summary", tmp_path / "2.json")
    assert f"reporting to Prefect server {prefect_server}" in proc.stderr
    second = _summary(tmp_path / "2.json")
    assert second["stages"]["preprocess"]["status"] == "cached"
    assert (second["stages"]["preprocess"]["items_processed"], second["stages"]["preprocess"]["items_cached"]) == (0, 6)
    assert second["stages"]["preprocess"]["key"] == first["key"]
    assert task_states(prefect_server, second["run"]["flow_run_id"]) == {"preprocess": "Cached"}
    assert len(list(Path(second["outputs"]["preprocess_dir"]).glob("*.png"))) == 6

    Image.new("RGB", (300, 400), "purple").save(images / "new one.png")
    boothflow("stage", "preprocess", *base, "--summary", tmp_path / "3.json")
    third = _summary(tmp_path / "3.json")["stages"]["preprocess"]
    assert (third["status"], third["items_processed"], third["items_cached"]) == ("ran", 1, 6)

    boothflow("stage", "preprocess", *base, "--set", "preprocess.resolution=128", "--summary", tmp_path / "4.json")
    fourth = _summary(tmp_path / "4.json")["stages"]["preprocess"]
    assert (fourth["items_processed"], fourth["items_cached"]) == (7, 0)


def test_a_users_folder_gets_each_documented_outcome(boothflow, tmp_path: Path) -> None:
    folder = tmp_path / "Urlaub 2024 ü"
    expected = build_user_folder(folder)
    before = _hashes(folder)
    boothflow(
        "stage", "preprocess", "--config", "configs/demo.toml", "--artifacts", tmp_path / "artifacts",
        "--set", f"data.instance_dir='{folder}'", "--set", "preprocess.resolution=512",
        "--summary", tmp_path / "s.json",
    )  # fmt: skip
    summary = _summary(tmp_path / "s.json")
    outcomes = _outcomes(summary)
    for name, want in expected.items():
        if want == "ignored":
            assert name not in outcomes, name
        else:
            assert _matches(outcomes[name], want), (name, outcomes[name], want)
    assert _hashes(folder) == before

    table = pd.read_csv(Path(summary["outputs"]["preprocess_dir"]).parent / "items.csv").set_index("source")
    upright = np.asarray(Image.open(Path(summary["outputs"]["preprocess_dir"]).parent / table.loc[USER_EXIF6, "image"]))
    assert upright.shape == (512, 512, 3)
    top, bottom = upright[:200].mean(axis=(0, 1)), upright[-200:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red above blue: upright


def test_broken_and_unusual_files_are_recorded_never_fatal(boothflow, tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    expected = build_broken_corpus(folder)
    before = _hashes(folder)
    args = [
        "stage", "preprocess", "--config", "configs/demo.toml", "--artifacts", tmp_path / "artifacts",
        "--set", f"data.instance_dir='{folder}'", "--set", "data.min_images=1",
        "--set", "preprocess.max_pixels=40000000",
    ]  # fmt: skip
    proc = boothflow(*args, "--summary", tmp_path / "1.json")
    assert "Traceback" not in proc.stdout + proc.stderr
    outcomes = _outcomes(_summary(tmp_path / "1.json"))
    assert {name for name, want in expected.items() if want != "ignored"} == set(outcomes)
    for name, want in expected.items():
        if want != "ignored":
            assert _matches(outcomes[name], want), (name, outcomes[name], want)
    assert _hashes(folder) == before

    boothflow(*args, "--summary", tmp_path / "2.json")
    again = _summary(tmp_path / "2.json")["stages"]["preprocess"]
    assert again["items_processed"] == 0 and again["status"] == "cached"


BAD_INPUTS = {  # id: (arguments, what the one line must say); {tmp} is a fresh folder
    "bad-resolution": (["--set", "preprocess.resolution=100"], "preprocess.resolution = 100"),
    "absurd-resolution": (["--set", "preprocess.resolution=1000000"], "multiple of 8 from 64 to 4096"),
    "bad-crop": (["--set", "preprocess.crop=sideways"], "preprocess.crop = 'sideways'"),
    "unknown-key": (["--set", "preprocess.colour=1"], "unknown setting 'preprocess.colour'; allowed in preprocess: "),
    "bad-int": (["--set", "data.min_images=few"], "data.min_images = 'few'"),
    "malformed-set": (["--set", "novalue"], "expected section.key=value"),
    "missing-file": (["--config", "configs/missing.toml"], "config file 'configs/missing.toml' not found"),
    "bad-size": (["--set", "generate.size=100"], "generate.size = 100"),
    "bad-lr-scheduler": (["--set", "train.lr_scheduler=cosinus"], "train.lr_scheduler = 'cosinus'"),
    "no-seeds": (["--set", "generate.seeds=[]"], "generate.seeds = []"),
    "empty-prompt": (["--set", "data.instance_prompt=''"], "data.instance_prompt = ''"),
    "no-seed-count": (["--set", "generate.seeds=0"], "a seed count must be 1 to 10000"),
    "moved-setting": (["--set", "report.analyser='toy'"], "report.analyser is now evaluate.analyser"),
    "zero-steps": (["--set", "train.steps=0"], "train.steps = 0"),
    "absurd-steps": (["--set", "train.steps=10000000000"], "train.steps = 10000000000"),
    "absurd-batch": (["--set", "generate.batch_size=100000"], "generate.batch_size = 100000"),
    "negative-guidance": (["--set", "generate.guidance=-1"], "generate.guidance = -1"),
    "unknown-scheduler": (["--set", "generate.scheduler=Fastest"], "generate.scheduler = 'Fastest': Input should be"),
    "unknown-prior-scheduler": (
        ["--set", "prior.enabled=true", "--set", "prior.scheduler=UNet2DModel"],
        "prior.scheduler = 'UNet2DModel'",
    ),
    "unknown-model": (["--set", "model.id='no-such-org/no-such-model'"], "model.id = 'no-such-org/no-such-model'"),
    "missing-vae": (["--set", "model.vae='/nonexistent/vae'"], "model.vae = '/nonexistent/vae': model '/nonexist"),
    "more-processes-than-cores": (
        ["--set", "train.num_processes=100000"],
        "train.num_processes = 100000: this machine can run at most ",
    ),
    "method-for-other-family": (
        ["--set", "train.method=lora"],
        "train.method = 'lora' is not supported for sd15 models (tiny-sd15); use full",
    ),
    "instance-dir-missing": (["--set", "data.instance_dir='{tmp}/none'"], "/none' does not exist; set it to a folder"),
    "instance-dir-a-file": (["--set", "data.instance_dir='{tmp}/file.txt'"], "/file.txt' is a file; set it to a"),
    "artifacts-a-file": (["--artifacts", "{tmp}/file.txt"], "/file.txt': cannot write there"),
    "toml-syntax": (["--config", "{tmp}/broken.toml"], "broken.toml"),
    "config-a-folder": (["--config", "{tmp}"], "' is a folder, not a TOML file; shipped configs: demo"),
    "unknown-section": (["--set", "nosuch.key=1"], "unknown setting 'nosuch'; allowed in top level: run, model"),
    "prompts-not-a-list": (["--set", "generate.prompts=5"], "generate.prompts = 5"),
    "empty-token": (["--set", "data.token=''"], "data.token = ''"),
    "token-of-two-words": (["--set", "data.token='two words'"], "data.token = 'two words'"),
    "unknown-pick": (["--set", "train.pick='best:fid'"], "train.pick = 'best:fid'"),
    "pick-without-kept-steps": (
        ["--set", "train.pick='best:dino'", "--set", "train.sample_every=0"],
        "chooses among kept steps: set train.sample_every",
    ),
    "margin-without-a-pick": (["--set", "train.pick_margin=0.1"], "train.pick_margin applies to a best pick"),
    "negative-margin": (["--set", "train.pick='best:dino'", "--set", "train.pick_margin=-1"], "train.pick_margin = -1"),
    "pick-without-its-scorer": (
        ["--set", "train.pick='best:dino'", "--set", "train.sample_every=2"],
        "train.pick = 'best:dino' needs evaluate.dino_model to score the steps",
    ),
}


@pytest.mark.parametrize(
    ("files", "usable"),
    [({}, 0), ({".DS_Store": b"x", "._a.jpg": b"x", "a.jpg.xmp": b"<x/>", "notes.txt": b"hi"}, 0)],
    ids=["empty-folder", "only-hidden-and-sidecar-files"],
)
def test_an_instance_folder_without_images_fails_in_one_line(boothflow, tmp_path: Path, files: dict, usable: int):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    proc = boothflow("run", "-c", "configs/demo.toml", "--artifacts", tmp_path / "a",
                     "--set", f"data.instance_dir='{folder}'", check=False)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"failed (preprocess, {folder}): only {usable} usable images"), last
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("args", "message"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_config_errors_are_one_line_without_traceback(boothflow, tmp_path: Path, args: list[str], message: str):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "broken.toml").write_text("[train\nsteps = 4\n")
    artifacts = [] if "--artifacts" in args else ["--artifacts", str(tmp_path / "artifacts")]
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in [*args, *artifacts]]
    proc = boothflow("run", "-c", "configs/demo.toml", *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[0], (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "artifacts") == ["broken.toml", "file.txt"]


def test_too_few_usable_images_fails_with_the_list_in_the_summary(boothflow, tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    Image.new("RGB", (300, 300), "red").save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"nope")
    proc = boothflow(
        "run", "--artifacts", tmp_path / "artifacts", "--set", f"data.instance_dir='{folder}'",
        "--set", "preprocess.resolution=64", "--summary", tmp_path / "s.json", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    summary = _summary(tmp_path / "s.json")
    assert summary["stages"]["preprocess"]["status"] == "failed"
    assert summary["error"]["stage"] == "preprocess"
    assert "only 1 usable images" in summary["error"]["message"] and "bad.jpg" in summary["error"]["message"]


def test_a_deleted_store_entry_is_recomputed_and_prefect_keeps_no_cache_records_of_its_own(
    boothflow, prefect_server: str, tmp_path: Path
) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    base = [
        "--artifacts",
        tmp_path / "artifacts",
        "--set",
        f"data.instance_dir='{images}'",
        "--set",
        "preprocess.resolution=64",
    ]
    boothflow("stage", "preprocess", *base, "--summary", tmp_path / "1.json")
    first = _summary(tmp_path / "1.json")
    entry = Path(first["outputs"]["preprocess_dir"]).parent
    assert task_states(prefect_server, first["run"]["flow_run_id"]) == {"preprocess": "Completed"}
    assert not (tmp_path / "artifacts" / ".prefect").exists()  # the store is the only cache
    shutil.rmtree(entry)

    boothflow("stage", "preprocess", *base, "--summary", tmp_path / "2.json")
    second = _summary(tmp_path / "2.json")
    stage = second["stages"]["preprocess"]
    assert (stage["status"], stage["items_processed"], stage["items_cached"]) == ("ran", 0, 6)
    assert task_states(prefect_server, second["run"]["flow_run_id"]) == {"preprocess": "Completed"}
    assert len(list(Path(second["outputs"]["preprocess_dir"]).glob("*.png"))) == 6


def test_cache_ls_verify_and_models_ls_show_what_is_there(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    artifacts = tmp_path / "artifacts"
    boothflow(
        "stage",
        "preprocess",
        "--artifacts",
        artifacts,
        "--set",
        f"data.instance_dir='{images}'",
        "--summary",
        tmp_path / "s.json",
    )
    key = _summary(tmp_path / "s.json")["stages"]["preprocess"]["key"]
    listing = boothflow("cache", "ls", "--artifacts", artifacts).stdout
    assert key in listing and listing.count("preprocess-items") == 6

    assert "checked 7 entries" in boothflow("cache", "verify", "--artifacts", artifacts).stdout
    image = sorted((artifacts / "preprocess" / key / "images").glob("*.png"))[0]
    data, before = bytearray(image.read_bytes()), image.stat()
    data[len(data) // 2] ^= 1
    image.write_bytes(data)  # in place: the preprocess item that shares this file (a hard link) is damaged too
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    item = next(p for p in (artifacts / "preprocess-items").iterdir() if p.joinpath("image.png").samefile(image))
    proc = boothflow("cache", "verify", "--artifacts", artifacts, check=False)
    assert proc.returncode == 1
    assert f"damaged: preprocess {key} images/{image.name}: bytes differ" in proc.stdout
    assert f"damaged: preprocess-items {item.name} image.png: bytes differ" in proc.stdout
    assert "2 damaged" in proc.stdout
    only = boothflow("cache", "verify", "--stage", "preprocess-items", "--artifacts", artifacts, check=False)
    assert only.returncode == 1 and f"preprocess {key}" not in only.stdout and "checked 6 entries" in only.stdout

    models = boothflow("models", "ls", "--artifacts", artifacts).stdout
    rows = {line.split("│")[1].strip(): line for line in models.splitlines() if line.count("│") > 2}
    for name in ("tiny-sd15", "tiny-sdxl", "sd15-arch", "sdxl-arch"):
        assert " no " in rows[name]  # built on first use, not by listing
    assert " yes " in rows["toy-sd"]  # shipped


def test_a_moved_artifact_root_serves_cache_hits_from_where_it_is_now(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    args = ["stage", "preprocess", "--set", f"data.instance_dir='{images}'", "--set", "preprocess.resolution=64"]
    boothflow(*args, "--artifacts", tmp_path / "old", "--summary", tmp_path / "1.json")
    (tmp_path / "old").rename(tmp_path / "new")
    boothflow(*args, "--artifacts", tmp_path / "new", "--summary", tmp_path / "2.json")
    summary = _summary(tmp_path / "2.json")
    assert summary["stages"]["preprocess"]["status"] == "cached"
    outputs = Path(summary["outputs"]["preprocess_dir"])
    assert outputs.is_relative_to(tmp_path / "new") and len(list(outputs.glob("*.png"))) == 6


def test_a_stage_entry_is_looked_up_once_per_run(prefect_server: str, tmp_path: Path, monkeypatch) -> None:
    """Each lookup reads the manifest and stats every file it lists, so a cached run does it once per entry and
    Prefect shows the entry the runner found as a `Cached` task."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.dreambooth import dreambooth_stage
    from tasks.core.config_load import load_config
    from tasks.core.store import Store

    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    root = tmp_path / "artifacts"
    config = load_config(None, [f"data.instance_dir='{images}'", "preprocess.resolution=64"], root)
    lookups: list[str] = []
    check = Store.inspect
    monkeypatch.setattr(Store, "inspect", lambda store, stage, key: lookups.append(stage) or check(store, stage, key))

    def preprocess_once() -> tuple[dict, int]:
        lookups.clear()
        with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
            summary = dreambooth_stage(config, "preprocess")
        return summary, lookups.count("preprocess")

    built, built_lookups = preprocess_once()
    key = built["stages"]["preprocess"]["key"]
    assert built["stages"]["preprocess"]["status"] == "ran"
    assert built_lookups == 3  # the run's lookup, a second look under the build lock, the check under the key's lock
    cached, cached_lookups = preprocess_once()
    assert (cached["stages"]["preprocess"]["status"], cached_lookups) == ("cached", 1)
    assert task_states(prefect_server, cached["run"]["flow_run_id"]) == {"preprocess": "Cached"}
    assert cached["stages"]["preprocess"]["key"] == key


def test_a_flow_started_without_the_cli_checks_its_config_before_any_stage(prefect_server: str, tmp_path: Path):
    """As a run from the UI or a deployment: the flow's own first step is the check the CLI makes."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.dreambooth import dreambooth
    from tasks.core.config_load import load_config

    root = tmp_path / "artifacts"
    config = load_config(None, [f"data.instance_dir='{tmp_path / 'missing'}'"], root)
    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        state = dreambooth(config, return_state=True)
    assert state.is_failed()
    summary = json.loads(next((root / "runs").glob("*/summary.json")).read_text())
    assert summary["error"]["stage"] == "config" and "data.instance_dir = " in summary["error"]["message"]
    assert {s["status"] for s in summary["stages"].values()} == {"skipped"}
    assert not (root / "preprocess").exists()


def test_a_concurrency_limit_the_server_lacks_stops_the_flow_before_any_stage(prefect_server: str, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.dreambooth import dreambooth
    from tasks.core.config_load import load_config

    root = tmp_path / "artifacts"
    config = load_config(None, ["run.concurrency_limit='no-such-limit'"], root)
    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        state = dreambooth(config, return_state=True)
    assert state.is_failed()
    summary = json.loads(next((root / "runs").glob("*/summary.json")).read_text())
    assert summary["error"] == {"stage": "config", "item": None, "message": "the Prefect server has no global "
                                "concurrency limit 'no-such-limit' (run.concurrency_limit); create it: prefect "
                                "global-concurrency-limit create no-such-limit --limit 1",
                                "expected": True}  # fmt: skip
    assert {s["status"] for s in summary["stages"].values()} == {"skipped"}
    assert task_states(prefect_server, summary["run"]["flow_run_id"]) == {}
    assert not (root / "preprocess").exists()


def test_a_failure_to_publish_never_hides_the_stages_own_error(
    prefect_server: str, tmp_path: Path, monkeypatch, caplog
) -> None:
    """After a failed stage, a publish error is one warning and the stage's error is the run's; after stages that
    succeeded, it fails the run."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows import dreambooth
    from tasks.core.config_load import load_config
    from tasks.core.faults import ENV

    def unpublishable(summary: dict, root: Path) -> None:
        raise OSError("the artifact API is down")

    monkeypatch.setattr(dreambooth, "publish", unpublishable)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"fail_stage": "preprocess"}))
    monkeypatch.setenv(ENV, str(faults))
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    config = load_config(None, [f"data.instance_dir='{images}'", "preprocess.resolution=64"], tmp_path / "artifacts")
    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        failed = dreambooth.dreambooth_stage(config, "preprocess", return_state=True)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        faults.unlink()
        succeeded = dreambooth.dreambooth_stage(config, "preprocess", return_state=True)
    error = failed.result(raise_on_failure=False)
    assert error.message == f"injected fault (fail_stage='preprocess' in {ENV})"
    run_id = str(failed.state_details.flow_run_id)
    summary = json.loads((tmp_path / "artifacts" / "runs" / run_id / "summary.json").read_text())
    assert summary["error"]["message"] == error.message
    assert "the run's artifacts were not published: OSError: the artifact API is down" in warnings
    assert str(succeeded.result(raise_on_failure=False)) == "the artifact API is down"


def test_a_photo_still_arriving_waits_for_the_next_run_and_is_listed(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "photos")
    now = time.time()
    hour_ago, minute_ago = now - 3600, now - 60
    for photo in images.iterdir():
        os.utime(photo, (hour_ago, hour_ago))  # arrived during the day
    arriving = images / "arriving.png"
    Image.open(next(images.iterdir())).rotate(90).save(arriving)
    os.utime(arriving, (minute_ago, minute_ago))
    settings = [f"data.instance_dir='{images}'", "data.settle_minutes=5", "train.steps=2", "train.checkpoint_every=0",
                "generate.steps=2", "generate.seeds=[0]"]  # fmt: skip
    base = ["run", "--config", "configs/demo.toml", "--artifacts", tmp_path / "artifacts"]
    base += [arg for setting in settings for arg in ("--set", setting)]

    done = boothflow(*base, "--summary", tmp_path / "1.json")
    first = _summary(tmp_path / "1.json")
    assert first["waiting"] == ["arriving.png"] and "arriving.png" not in _outcomes(first)
    assert "waiting for the next run (modified in the last data.settle_minutes): arriving.png" in done.stderr
    page = Path(first["outputs"]["report_html"]).read_text()
    assert "Waiting for the next run (1)" in page and "<li>arriving.png</li>" in page

    os.utime(arriving, (now - 600, now - 600))  # settled
    boothflow(*base, "--summary", tmp_path / "2.json")
    second = _summary(tmp_path / "2.json")
    assert second["waiting"] == [] and _outcomes(second)["arriving.png"].startswith("ok")
    assert second["stages"]["preprocess"]["items_processed"] == 1 and second["stages"]["train"]["status"] == "ran"
