"""The stage store: atomic entries, manifests that catch damage, lookups that cost a stat, one computation per key
across processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import start, stop

from tasks.core import manifest as manifest_module
from tasks.core import store as store_module
from tasks.core.atomic import link_or_copy
from tasks.core.manifest import MANIFEST, STAT_MEMO, Damage, file_stat
from tasks.core.store import Store, stage_key

REPO = Path(__file__).resolve().parents[1]


def _write(text: str):
    def build(folder: Path) -> dict:
        (folder / "out.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "more.bin").write_bytes(b"\x00" * 100)
        return {"items": 2}

    return build


def _flip_byte_keeping_mtime(file: Path, offset: int = 0) -> None:
    """A same-size edit whose writer puts the mtime back, as `touch -r` or `cp -p` would."""
    before = file.stat()
    with file.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every file the store reads to hash, in order."""
    names: list[str] = []
    real = manifest_module.file_sha256
    for module in (store_module, manifest_module):  # hashed when an entry is made, and when a lookup checks a file
        monkeypatch.setattr(module, "file_sha256", lambda path, *a: names.append(path.name) or real(path, *a))
    return names


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
    ("damage", "file", "problem"),
    [
        (lambda p: (p / "out.txt").write_text("hellO"), "out.txt", "bytes differ"),  # same size, other bytes
        (lambda p: (p / "out.txt").write_text("hello!"), "out.txt", "6 bytes, the manifest says 5"),
        (lambda p: os.truncate(p / "sub" / "more.bin", 50), "sub/more.bin", "50 bytes, the manifest says 100"),
        (lambda p: (p / "sub" / "more.bin").unlink(), "sub/more.bin", "missing"),
        (lambda p: (p / MANIFEST).unlink(), MANIFEST, "missing or unreadable"),
        (lambda p: (p / MANIFEST).write_text("{not json"), MANIFEST, "missing or unreadable"),
    ],
    ids=["same-size-edit", "resized", "truncated", "file-deleted", "manifest-deleted", "manifest-corrupt"],
)
def test_a_damaged_entry_is_set_aside_said_in_one_line_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, file: str, problem: str
) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    damage(entry.path)
    snapshot = {f.relative_to(entry.path): f.read_bytes() for f in entry.path.rglob("*") if f.is_file()}
    with caplog.at_level("WARNING"):
        assert store.get("stage", "k1") is None
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"damaged cache entry stage/k1: {file} {problem}") and "kept aside as k1.damaged-" in line
    [aside] = [p for p in (tmp_path / "stage").iterdir() if p.name.startswith("k1.damaged-")]
    assert {f.relative_to(aside): f.read_bytes() for f in aside.rglob("*") if f.is_file()} == snapshot  # all kept
    rebuilt = store.get_or_create("stage", "k1", _write("hello"))
    assert rebuilt.created and store.is_complete("stage", "k1")
    assert [e["state"] for e in store.entries()] == ["complete", "damaged"]


def test_damage_found_inside_get_or_create_is_set_aside_too(tmp_path: Path) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    _flip_byte_keeping_mtime(entry.path / "out.txt")  # a changed ctime: the lookup re-hashes
    rebuilt = store.get_or_create("stage", "k1", _write("hello"))
    assert rebuilt.created and (rebuilt.path / "out.txt").read_text() == "hello"
    [aside] = [p for p in (tmp_path / "stage").iterdir() if ".damaged-" in p.name]
    assert (aside / "out.txt").read_text() == "iello"


def test_a_file_a_user_adds_to_an_entry_is_not_damage(tmp_path: Path) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    (entry.path / "notes.md").write_text("my notes")
    (entry.path / "sub" / "extra.bin").write_bytes(b"1")
    assert store.get("stage", "k1") is not None and store.verify().damaged == []


def test_a_lookup_of_an_intact_entry_reads_no_file(tmp_path: Path, hashed: list[str]) -> None:
    store = Store(tmp_path)
    store.get_or_create("stage", "k1", _write("hello"))
    assert sorted(hashed) == ["more.bin", "out.txt"]  # hashed once, at creation
    hashed.clear()
    for _ in range(3):
        assert store.get("stage", "k1") is not None
    assert hashed == []


def test_a_changed_stat_is_rehashed_and_then_trusted_again(tmp_path: Path, hashed: list[str]) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    os.utime(entry.path / "out.txt", ns=(0, 10**18))  # a new mtime, same bytes (as a backup tool may leave it)
    hashed.clear()
    assert store.get("stage", "k1") is not None and hashed == ["out.txt"]  # only the file whose stat changed
    assert store.get("stage", "k1") is not None and hashed == ["out.txt"]  # its memo was refreshed
    assert [p.name for p in entry.path.iterdir() if ".tmp" in p.name] == []


def test_an_entry_made_before_memos_is_hashed_once_then_memoized(tmp_path: Path, hashed: list[str]) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    (entry.path / STAT_MEMO).unlink()
    hashed.clear()
    assert store.get("stage", "k1") is not None and sorted(hashed) == ["more.bin", "out.txt"]
    assert store.get("stage", "k1") is not None and len(hashed) == 2


def test_what_a_stat_cannot_see_only_verify_finds(tmp_path: Path) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _write("hello"))
    store.get_or_create("other", "k2", _write("fine"))
    assert store.verify() == store_module.Verification(entries=2, bytes=105 + 104, damaged=[])
    _flip_byte_keeping_mtime(entry.path / "out.txt", 1)
    memo = json.loads((entry.path / STAT_MEMO).read_text())  # bytes rotting on the disk leave the stat as it was
    memo["files"]["out.txt"] = file_stat(entry.path / "out.txt")
    (entry.path / STAT_MEMO).write_text(json.dumps(memo))
    assert store.get("stage", "k1") is not None  # the documented limit of a lookup

    (entry.path / "sub" / "more.bin").unlink()
    assert store.verify("other").damaged == []
    found = store.verify()
    assert found.damaged == [
        Damage("stage", "k1", "out.txt", "bytes differ from the manifest's sha256"),
        Damage("stage", "k1", "sub/more.bin", "missing"),
    ]
    (entry.path / "sub" / "more.bin").write_bytes(b"\x00" * 100)  # the deletion undone: only the rot is left
    assert store.get("stage", "k1") is None  # verify dropped the damaged entry's memo: the lookup re-checked


def test_hard_linked_files_keep_both_entries_honest(tmp_path: Path, hashed: list[str]) -> None:
    """A link changes the shared inode's ctime: the item's memo goes stale and costs one re-hash of that file;
    an edit through either path is seen by both entries."""
    store = Store(tmp_path)
    item = store.get_or_create("stage-items", "i1", _write("hello"))

    def link(folder: Path) -> dict:
        link_or_copy(item.path / "out.txt", folder / "image.txt")
        return {}

    linked = store.get_or_create("stage", "k1", link)
    assert (linked.path / "image.txt").stat().st_ino == (item.path / "out.txt").stat().st_ino
    hashed.clear()
    assert store.get("stage", "k1") is not None and hashed == []
    assert store.get("stage-items", "i1") is not None and hashed == ["out.txt"]
    assert store.get("stage-items", "i1") is not None and hashed == ["out.txt"]

    _flip_byte_keeping_mtime(linked.path / "image.txt")
    assert store.get("stage", "k1") is None and store.get("stage-items", "i1") is None


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def broken(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.get_or_create("stage", "k1", broken)
    assert list((tmp_path / "stage").iterdir()) == []


def _in_a_process(function: str, *args: object) -> subprocess.Popen:
    """This module's `function(*args)` (as strings) in a new Python process, in its own process group."""
    code = f"import sys; from test_store import {function}; {function}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return start([sys.executable, "-c", code, *args], cwd=REPO, env=env)


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
    procs = [_in_a_process("_slow_build", tmp_path / "root", marker) for _ in range(2)]
    try:
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        stop(*procs)
    assert len(marker.read_text().split()) == 1


def _hang_in_build(root: str) -> None:
    def build(folder: Path) -> dict:
        (folder / "partial.txt").write_text("x")
        time.sleep(60)
        return {}

    Store(Path(root)).get_or_create("stage", "k", build)


def test_killed_writer_leaves_no_trusted_entry_and_no_stuck_lock(tmp_path: Path) -> None:
    writer = _in_a_process("_hang_in_build", tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not list((tmp_path / "stage").glob("k.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(writer, first=signal.SIGKILL)  # killed mid-build, holding the key's lock
    assert writer.returncode == -signal.SIGKILL and list((tmp_path / "stage").glob("k.partial-*"))
    store = Store(tmp_path)
    assert store.get("stage", "k") is None
    lock = store.lock("stage", "k")
    lock.acquire(timeout=0)  # at once: the lock died with its holder
    lock.release()
    assert store.get_or_create("stage", "k", _write("fresh")).created
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
