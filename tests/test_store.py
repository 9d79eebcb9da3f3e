"""The stage store: atomic entries, manifests that catch damage, one computation per key across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tasks.core.store import MANIFEST, Store, stage_key


def _write(text: str):
    def build(folder: Path) -> dict:
        (folder / "out.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "more.bin").write_bytes(b"\x00" * 100)
        return {"items": 2}

    return build


def test_entry_is_committed_with_manifest_and_reused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.get_or_create("stage", "k1", _write("hello"), {"a": 1})
    assert first.created and first.info == {"items": 2}
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"out.txt", "sub/more.bin"}
    assert manifest["files"]["sub/more.bin"]["size"] == 100
    assert manifest["config"] == {"a": 1} and "torch" in manifest["versions"]
    second = store.get_or_create("stage", "k1", _write("other"))
    assert not second.created and (second.path / "out.txt").read_text() == "hello"
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["k1"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "out.txt").write_text("hellO"),  # same size, other bytes
        lambda p: (p / "out.txt").write_text("hello!"),
        lambda p: (p / "sub" / "more.bin").unlink(),
        lambda p: (p / MANIFEST).unlink(),
        lambda p: (p / MANIFEST).write_text("{not json"),
    ],
    ids=["same-size-edit", "resized", "file-deleted", "manifest-deleted", "manifest-corrupt"],
)
def test_damaged_entry_is_not_trusted_and_is_rebuilt(tmp_path: Path, damage) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    damage(entry.path)
    assert store.get("stage", "k1") is None
    rebuilt = store.get_or_create("stage", "k1", _write("hello"))
    assert rebuilt.created and store.is_complete("stage", "k1")


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def broken(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.get_or_create("stage", "k1", broken)
    assert list((tmp_path / "stage").iterdir()) == []


def _slow_build(root: str, marker: str) -> None:
    def build(folder: Path) -> dict:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (folder / "out.txt").write_text("done")
        return {}

    Store(Path(root)).get_or_create("stage", "shared", build)


def test_two_processes_compute_a_key_once(tmp_path: Path) -> None:
    marker = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "root"), str(marker))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(marker.read_text().split()) == 1


def _hang_in_build(root: str) -> None:
    def build(folder: Path) -> dict:
        (folder / "partial.txt").write_text("x")
        time.sleep(60)
        return {}

    Store(Path(root)).get_or_create("stage", "k", build)


def test_killed_writer_leaves_no_trusted_entry_and_no_stuck_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_hang_in_build, args=(str(tmp_path),))
    proc.start()
    deadline = time.monotonic() + 30
    while not list((tmp_path / "stage").glob("k.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = Store(tmp_path)
    assert store.get("stage", "k") is None
    started = time.monotonic()
    entry = store.get_or_create("stage", "k", _write("fresh"))
    assert entry.created and time.monotonic() - started < 5
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["k"]


def test_key_is_canonical_and_sensitive() -> None:
    base = stage_key("s", 1, {"a": 1, "b": [1, 2]}, up="x")
    assert base == stage_key("s", 1, {"b": [1, 2], "a": 1}, up="x")
    assert (
        len(
            {
                base,
                stage_key("s", 2, {"a": 1, "b": [1, 2]}, up="x"),
                stage_key("s", 1, {"a": 2, "b": [1, 2]}, up="x"),
                stage_key("s", 1, {"a": 1, "b": [1, 2]}, up="y"),
                stage_key("t", 1, {"a": 1, "b": [1, 2]}, up="x"),
            }
        )
        == 5
    )
