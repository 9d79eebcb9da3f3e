"""Commits that survive a power cut: a store entry, its stat memo and a checkpoint reach the disk (fsync) in the order
that keeps a rerun from trusting missing bytes: files, what vouches for them, their folder, then the rename."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_checkpoints import Model, _job

from tasks.core.manifest import MANIFEST, STAT_MEMO
from tasks.core.store import Store
from tasks.training.checkpoints import COMPLETE, complete_checkpoints, save_checkpoint


@pytest.fixture
def disk_ops(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync (with the path its descriptor names when it is called), rename and replace, in order."""
    ops: list[tuple[str, ...]] = []
    real = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        ops.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real[0](fd)

    def rename(source, target) -> None:
        ops.append(("rename", str(source), str(target)))
        real[1](source, target)

    def replace(source, target) -> None:
        ops.append(("replace", str(source), str(target)))
        real[2](source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return ops


def _build(folder: Path) -> dict:
    (folder / "image.png").write_bytes(b"png")  # flushed before the manifest, though it sorts first
    (folder / "sub").mkdir()
    (folder / "sub" / "more.bin").write_bytes(b"\x00" * 100)
    return {}


def _folder_rename(ops: list[tuple[str, ...]], final: Path) -> tuple[int, Path]:
    """The index of the one rename that put a partial folder in `final`'s place, and that partial folder."""
    [(index, source)] = [(i, Path(op[1])) for i, op in enumerate(ops) if op[0] == "rename" and op[2] == str(final)]
    return index, source


def _last_flushes(ops: list[tuple[str, ...]]) -> dict[Path, int]:
    """Each flushed path and the index of its last flush."""
    return {Path(op[1]): i for i, op in enumerate(ops) if op[0] == "fsync"}


def test_an_entry_flushes_its_files_then_its_manifest_then_its_folders_then_renames(
    tmp_path: Path, disk_ops: list[tuple[str, ...]]
) -> None:
    final = tmp_path / "stage" / "k1"
    Store(tmp_path).get_or_create("stage", "k1", _build)
    rename, partial = _folder_rename(disk_ops, final)
    flushed = _last_flushes(disk_ops[:rename])
    files = [partial / "image.png", partial / "sub" / "more.bin", partial / STAT_MEMO]
    assert max(flushed[file] for file in files) < flushed[partial / MANIFEST]  # the manifest vouches for them all
    assert flushed[partial / MANIFEST] < flushed[partial / "sub"] < flushed[partial]  # each folder after its names
    assert disk_ops[rename + 1 :] == [("fsync", str(final.parent))]  # and the rename itself
    assert Store(tmp_path).get("stage", "k1") is not None


def test_a_refreshed_stat_memo_is_flushed_before_it_replaces_the_old_one_and_its_folder_after(
    tmp_path: Path, disk_ops: list[tuple[str, ...]]
) -> None:
    store = Store(tmp_path)
    entry = store.get_or_create("stage", "k1", _build)
    os.utime(entry.path / "image.png", ns=(0, 10**18))  # a changed stat: the lookup re-hashes and rewrites the memo
    disk_ops.clear()
    assert store.get("stage", "k1") is not None
    [(_, temp), replace, folder] = disk_ops
    assert replace == ("replace", temp, str(entry.path / STAT_MEMO)) and Path(temp).parent == entry.path
    assert folder == ("fsync", str(entry.path))


def test_a_failed_flush_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        Store(tmp_path).get_or_create("stage", "k1", _build)
    assert list((tmp_path / "stage").iterdir()) == []


def test_a_checkpoint_is_flushed_before_its_rename_and_its_complete_mark_after_it(
    tmp_path: Path, disk_ops: list[tuple[str, ...]]
) -> None:
    model = Model()
    model.step()
    save_checkpoint(_job(tmp_path), 1, model.params, {"optimizer": model.optimizer.state_dict()}, [])
    final = tmp_path / "step-000001"
    rename, partial = _folder_rename(disk_ops, final)
    flushed = _last_flushes(disk_ops[:rename])
    files = [p for p in final.iterdir() if p.name != COMPLETE]
    assert len(files) == 5 and max(flushed[partial / file.name] for file in files) < flushed[partial] < rename
    [parent, (_, temp), replace, folder] = disk_ops[rename + 1 :]
    assert parent == ("fsync", str(tmp_path))
    assert replace == ("replace", temp, str(final / COMPLETE)) and Path(temp).parent == final  # the mark, flushed
    assert folder == ("fsync", str(final))  # and its name
    assert complete_checkpoints(tmp_path) == [final]
