"""Folders that appear whole or not at all: written under a `.partial-*` name beside their place, then renamed.

Every writer of a folder other processes read (store entries, presets, checkpoints, the toy model) uses this one
helper, so a killed writer leaves only a partial folder that no reader trusts and the next writer clears. Its files
and names are flushed to the disk before and after the rename, so a power cut cannot leave a trusted folder with
missing bytes either. Files move between such folders by hard link where they can, so sharing them costs no space.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's names (files created, renamed or removed in it), to the disk: only then do
    they survive a power cut, and a rename may reach the disk before them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, last: str | None = None) -> None:
    """Flush every file under `folder`, then its file `last` (one that vouches for the others, as a manifest does),
    then every folder, each after what it holds."""
    found = sorted(folder.rglob("*"), reverse=True)  # a folder after its contents
    sealed = [folder / last] if last else []
    for path in [p for p in found if p.is_file() and p not in sealed] + sealed + [p for p in found if p.is_dir()]:
        fsync(path)
    fsync(folder)


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole: a flushed temp file beside it renamed over it, so a reader (or a power cut) sees the old
    file or the new one, never a part; the temp file is removed if that fails."""
    temp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_bytes(data)
        fsync(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = False, last: str | None = None) -> Iterator[Path]:
    """Yield a new empty partial folder beside `target`; when the block ends it is flushed to the disk (its file
    `last` after the others, see `fsync_tree`) and becomes `target` (an existing one is replaced only with
    `replace`), and when the block fails it is removed."""
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        yield partial
        fsync_tree(partial, last)
        if replace and target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        fsync(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def clear_partials(target: Path) -> None:
    """Remove partial folders a killed writer left beside `target`; call it holding the lock its writers take."""
    for leftover in target.parent.glob(f"{glob.escape(target.name)}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Share a committed item's file with a stage entry: a hard link costs no space; copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
