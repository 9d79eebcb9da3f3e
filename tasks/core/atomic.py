"""Folders that appear whole or not at all: written under a `.partial-*` name beside their place, then renamed.

Every writer of a folder other processes read (store entries, presets, checkpoints, the toy model) uses this one
helper, so a killed writer leaves only a partial folder that no reader trusts and the next writer clears.
Files move between such folders by hard link where they can, so sharing them costs no space.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty partial folder beside `target`; when the block ends it becomes `target` (an existing one is
    replaced only with `replace`), and when the block fails it is removed."""
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        yield partial
        if replace and target.exists():
            shutil.rmtree(target)
        partial.rename(target)
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
