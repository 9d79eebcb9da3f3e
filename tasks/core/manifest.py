"""An entry's manifest and stat memo: what a lookup checks (a stat per file) and what it trusts (the sha256 the
manifest lists), and the hashing both rest on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from stat import S_ISREG
from typing import Any

from tasks.core.atomic import replace_file

MANIFEST = "manifest.json"
STAT_MEMO = "stat-memo.json"
VERSIONED_PACKAGES = ("boothflow", "torch", "diffusers", "transformers", "peft", "pillow", "opencv-python-headless")


@dataclass(frozen=True)
class Damage:
    """One file of a complete entry that no longer matches its manifest."""

    stage: str
    key: str
    file: str
    problem: str


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The file's sha256; `progress(n)` hears of every n bytes read."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def file_stat(path: Path) -> list[int] | None:
    """What the stat memo records of a regular file: size, mtime_ns, ctime_ns, inode; None when there is none.

    ctime is kept because no user call can set it: a writer that restores the mtime (os.utime, `touch -r`,
    `cp -p`) or a restore onto a fresh filesystem that reuses inode numbers still changes it.
    """
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino] if S_ISREG(stat.st_mode) else None


def read_manifest(path: Path) -> tuple[dict[str, Any], str] | None:
    """The entry's manifest and the sha256 of its bytes (what its stat memo is bound to); None if unreadable."""
    try:
        text = (path / MANIFEST).read_bytes()
        manifest = json.loads(text)
        if not all(isinstance(m["size"], int) and isinstance(m["sha256"], str) for m in manifest["files"].values()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest, hashlib.sha256(text).hexdigest()


def read_memo(path: Path, fingerprint: str) -> dict[str, list[int]]:
    """The stats recorded when the files last proved intact, if recorded under this very manifest; else none."""
    try:
        memo = json.loads((path / STAT_MEMO).read_text())
        return memo["files"] if memo["manifest_sha256"] == fingerprint else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_memo(path: Path, fingerprint: str, stats: dict[str, list[int] | None]) -> None:
    """Replace the memo whole and flushed, so a concurrent reader (or a power cut) sees the old one or the new
    one; where it cannot be written (a read-only store) lookups keep re-hashing, which is slow but correct."""
    with contextlib.suppress(OSError):
        replace_file(path / STAT_MEMO, json.dumps({"manifest_sha256": fingerprint, "files": stats}).encode())


def forget_memo(path: Path) -> None:
    """Drop the memo of an entry found damaged, so the next lookup re-hashes it and finds it missing."""
    with contextlib.suppress(OSError):
        (path / STAT_MEMO).unlink(missing_ok=True)


def file_problem(
    file: Path, meta: dict[str, Any], stat: list[int] | None, rehash: bool, progress: Callable[[int], None] | None
) -> str | None:
    """What is wrong with one listed file, given its stat; its bytes are hashed only when `rehash`."""
    if stat is None:
        return "missing"
    if stat[0] != meta["size"]:
        return f"{stat[0]} bytes, the manifest says {meta['size']}"
    if rehash and file_sha256(file, progress) != meta["sha256"]:
        return "bytes differ from the manifest's sha256"
    return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
