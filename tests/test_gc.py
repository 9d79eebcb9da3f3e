"""`boothflow cache gc`: removes what it is asked to, and never an entry a running run uses."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
from conftest import BIN, REPO
from processes import started

from flows.gc import Rules, collect
from flows.records import RunKeys, summary_path
from tasks.core.atomic import link_or_copy
from tasks.core.store import Store
from tasks.stages import promotion
from tasks.stages.promotion import Promotion
from tasks.stages.train import EMBEDS

STAGES = ["preprocess", "train"]


def _entry(store: Store, stage: str, key: str, item: Path | None = None) -> Path:
    def build(folder: Path) -> dict:
        (folder / "data.bin").write_bytes(key.encode() * 100)
        if item is not None:
            link_or_copy(item / "item.bin", folder / "item.bin")
        return {}

    return store.get_or_create(stage, key, build).path


def _item(store: Store, key: str) -> Path:
    def build(folder: Path) -> dict:
        (folder / "item.bin").write_bytes(key.encode() * 10)
        return {}

    return store.get_or_create("preprocess-items", key, build).path


def _runs(root: Path, *runs: list[str]) -> None:
    for number, keys in enumerate(runs):
        with RunKeys(root, f"run-{number}") as run:
            for key in keys:
                run.use(*key.split("/"))
        time.sleep(0.02)  # runs are ordered by when they last registered a key


def _left(root: Path) -> set[str]:
    return {f"{e['stage']}/{e['key']}" for e in Store(root).entries()}


def _store(tmp_path: Path) -> Path:
    store = Store(tmp_path)
    old_item, new_item = _item(store, "i-old"), _item(store, "i-new")
    _entry(store, "preprocess", "p-old", old_item)
    _entry(store, "preprocess", "p-new", new_item)
    _entry(store, "train", "t-old")
    _entry(store, "train", "t-new")
    _entry(store, "report", "not-a-gc-stage")
    _runs(tmp_path, ["preprocess/p-old", "train/t-old"], ["preprocess/p-new", "train/t-new"])
    return tmp_path


def test_keep_last_removes_what_older_runs_alone_used_and_their_items(tmp_path: Path) -> None:
    root = _store(tmp_path)
    before = _left(root)
    removals, _, to_free = collect(root, STAGES, Rules(keep_last=1), dry_run=True)
    assert {f"{r.stage}/{r.folder}" for r in removals} == {"preprocess/p-old", "train/t-old", "preprocess-items/i-old"}
    assert _left(root) == before  # a dry run removes nothing
    _, _, freed = collect(root, STAGES, Rules(keep_last=1), dry_run=False)
    assert freed == to_free == sum(r.bytes for r in removals) - len(b"i-old" * 10)  # i-old's file, linked in p-old
    assert _left(root) == before - {"preprocess/p-old", "train/t-old", "preprocess-items/i-old"}
    assert Store(root).get("preprocess", "p-new") is not None and Store(root).get("train", "t-new") is not None


def test_both_rules_must_agree_and_damaged_entries_go_only_when_asked(tmp_path: Path) -> None:
    root = _store(tmp_path)
    (root / "train" / "t-new" / "data.bin").write_bytes(b"rot")
    assert Store(root).get("train", "t-new") is None  # set aside as damaged
    removals, _, _ = collect(root, STAGES, Rules(keep_last=1, older_than_days=1.0), dry_run=False)
    assert removals == []  # everything was used within a day
    assert any(".damaged-" in name for name in _left(root))
    removals, _, _ = collect(root, STAGES, Rules(damaged=True), dry_run=False)
    assert [r.why for r in removals] == ["damaged, set aside"]
    assert not any(".damaged-" in name for name in _left(root))


def test_an_entry_a_running_run_registered_is_never_removed(tmp_path: Path) -> None:
    root = _store(tmp_path)
    with RunKeys(root, "running") as run:
        run.use("train", "t-old")
        removals, notes, freed = collect(root, STAGES, Rules(keep_last=0, older_than_days=0), dry_run=False)
        assert {f"{r.stage}/{r.folder}" for r in removals} == {"preprocess/p-old", "preprocess/p-new", "train/t-new"}
        assert notes == ["item entries kept: 1 run(s) running"]
        assert freed == sum(r.bytes for r in removals) - 2 * len(b"i-old" * 10)  # the kept items still hold theirs
    assert _left(root) == {"train/t-old", "report/not-a-gc-stage", "preprocess-items/i-old", "preprocess-items/i-new"}


def test_removed_entries_take_their_lock_files_with_them(tmp_path: Path) -> None:
    locks = _store(tmp_path) / ".locks" / "store"
    assert (locks / "preprocess-p-old.lock").is_file()
    collect(tmp_path, STAGES, Rules(keep_last=1), dry_run=False)
    assert sorted(p.name for p in locks.iterdir()) == [
        "preprocess-items-i-new.lock", "preprocess-p-new.lock", "report-not-a-gc-stage.lock", "train-t-new.lock"
    ]  # fmt: skip


def test_text_embeddings_are_item_entries_of_train(tmp_path: Path) -> None:
    """Training reads them in place (no stage entry links them), so they go with the other items once no run runs."""
    root = _store(tmp_path)
    _entry(Store(root), EMBEDS, "e")
    with RunKeys(root, "running") as run:
        run.use("train", "t-new")
        removals, _, _ = collect(root, STAGES, Rules(keep_last=1), dry_run=True)
    assert f"{EMBEDS}/e" not in {f"{r.stage}/{r.folder}" for r in removals}
    removals, _, _ = collect(root, STAGES, Rules(keep_last=1), dry_run=False)
    assert f"{EMBEDS}/e" in {f"{r.stage}/{r.folder}" for r in removals} and f"{EMBEDS}/e" not in _left(root)


def _training(pid: int) -> list[psutil.Process]:
    """The training launcher (and its child, once started) under the run with `pid`."""
    return [p for p in psutil.Process(pid).children(True) if "tasks.training" in " ".join(p.cmdline())]


def test_gc_during_a_run_removes_an_older_runs_entries_and_the_run_completes(boothflow, cli_env, tmp_path: Path):
    root = tmp_path / "a"
    base = ["-c", "configs/demo.toml", "--artifacts", root, "--set", "train.checkpoint_every=0",
            "--set", "train.sample_every=0", "--set", "generate.steps=2"]  # fmt: skip
    boothflow("run", *base, "--set", "train.steps=4", "--summary", tmp_path / "old.json")
    old = json.loads((tmp_path / "old.json").read_text())["stages"]
    with started(
        [BIN / "boothflow", "run", *base, "--set", "train.steps=20", "--summary", tmp_path / "new.json"],
        cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        deadline = time.monotonic() + 300
        while not (training := _training(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        for process in training:  # training holds still while gc runs, however fast or loaded this machine is
            process.suspend()
        try:
            gc = boothflow("cache", "gc", "--artifacts", root, "--keep-last", "0")
        finally:
            for process in training:
                process.resume()
        assert f"removed train/{old['train']['key']}" in gc.stdout, gc.stdout
        assert f"preprocess/{old['preprocess']['key']}" not in gc.stdout  # the running run uses it
        assert "item entries kept: 1 run(s) running" in gc.stdout
        assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    new = json.loads((tmp_path / "new.json").read_text())
    assert new["error"] is None and new["stages"]["preprocess"]["key"] == old["preprocess"]["key"]
    assert not (root / "train" / old["train"]["key"]).exists()
    assert Store(root).get("train", new["stages"]["train"]["key"]) is not None


def test_keep_nights_keeps_each_subjects_last_runs_and_its_published_model(tmp_path: Path) -> None:
    """Subject a trained three times (its first model published), b once; a run that recorded no instance folder is
    nobody's night and keeps what it used."""
    store = Store(tmp_path)
    for key in ("a1", "a2", "a3", "b1", "x1"):
        _entry(store, "train", key)
    _runs(tmp_path, ["train/a1"], ["train/a2"], ["train/a3"], ["train/b1"], ["train/x1"])
    for number, folder in enumerate(["a", "a", "a", "b"]):
        summary_path(tmp_path, f"run-{number}").write_text(json.dumps({"run": {"instance_dir": f"/photos/{folder}"}}))
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.bin").write_bytes(b"a1")
    published = Promotion(True, "", None, None, "the subject's first model")
    promotion.publish(tmp_path, "a", model, {"keys": {"train": "a1", "generate": None}}, published)

    def removed(nights: int) -> set[str]:
        removals, _, _ = collect(tmp_path, STAGES, Rules(keep_nights=nights), dry_run=True)
        return {f"{r.stage}/{r.folder}" for r in removals}

    assert removed(1) == {"train/a2"}
    assert removed(0) == {"train/a2", "train/a3", "train/b1"}
    assert removed(3) == set()
    removals, _, _ = collect(tmp_path, STAGES, Rules(keep_last=2, keep_nights=1), dry_run=False)  # both must agree
    assert {f"{r.stage}/{r.folder}" for r in removals} == {"train/a2"} and "train/a2" not in _left(tmp_path)
