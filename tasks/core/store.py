"""Content-addressed stage store: `<root>/<stage>/<key>/` entries committed atomically with a manifest.

An entry counts only when its manifest exists and every file it lists matches, so a killed or failed
writer never leaves anything a rerun would trust. One lock per key keeps two runs from computing it twice.
A lookup proves "matches" with a stat per file against a memo written with the entry, so it reads no file data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from stat import S_ISREG
from typing import Any

from filelock import FileLock

from tasks.core.atomic import atomic_folder, clear_partials

MANIFEST = "manifest.json"
STAT_MEMO = "stat-memo.json"
KEY_LENGTH = 24
VERSIONED_PACKAGES = ("boothflow", "torch", "diffusers", "transformers", "peft", "pillow", "opencv-python-headless")


def digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(stage: str, code_version: int, config: dict[str, Any], **parts: Any) -> str:
    """The key of a stage (or item) output: everything that can change it, and no folder path."""
    return digest({"stage": stage, "code_version": code_version, "config": config, **parts})[:KEY_LENGTH]


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


def link_or_copy(source: Path, target: Path) -> None:
    """Share a committed item's file with a stage entry: a hard link costs no space; copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _read_manifest(path: Path) -> tuple[dict[str, Any], str] | None:
    """The entry's manifest and the sha256 of its bytes (what its stat memo is bound to); None if unreadable."""
    try:
        text = (path / MANIFEST).read_bytes()
        manifest = json.loads(text)
        if not all(isinstance(m["size"], int) and isinstance(m["sha256"], str) for m in manifest["files"].values()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest, hashlib.sha256(text).hexdigest()


def _read_memo(path: Path, fingerprint: str) -> dict[str, list[int]]:
    """The stats recorded when the files last proved intact, if recorded under this very manifest; else none."""
    try:
        memo = json.loads((path / STAT_MEMO).read_text())
        return memo["files"] if memo["manifest_sha256"] == fingerprint else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_memo(path: Path, fingerprint: str, stats: dict[str, list[int] | None]) -> None:
    """Replace the memo whole (temp file, then os.replace), so a concurrent reader sees the old one or the new
    one; where it cannot be written (a read-only store) lookups keep re-hashing, which is slow but correct."""
    temp = path / f"{STAT_MEMO}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        temp.write_text(json.dumps({"manifest_sha256": fingerprint, "files": stats}))
        os.replace(temp, path / STAT_MEMO)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def _forget_memo(path: Path) -> None:
    """Drop the memo of an entry found damaged, so the next lookup re-hashes it and finds it missing."""
    with contextlib.suppress(OSError):
        (path / STAT_MEMO).unlink(missing_ok=True)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Entry:
    """A committed store entry: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    created: bool

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})


@dataclass(frozen=True)
class Damage:
    """One file of a complete entry that no longer matches its manifest."""

    stage: str
    key: str
    file: str
    problem: str


@dataclass(frozen=True)
class Verification:
    """What a full check of the store saw: entries and bytes checked, and every damaged file."""

    entries: int
    bytes: int
    damaged: list[Damage]


class Store:
    """The artifact root's stage entries; no state beyond the folder itself."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        """A per-key lock held through an open file: the OS drops it when its holder dies."""
        locks = self.root / ".locks" / "store"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{stage}-{key}.lock")

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The entry's manifest when the entry is complete and intact, else None.

        Every listed file must have its manifest size and the stat its memo recorded; a file whose stat
        differs (or an entry without a memo, made before memos existed) is re-hashed now and must match its
        sha256, and then the memo is brought up to date. So a warm lookup costs a stat per file, never a read.
        What a stat cannot see: bytes changed under an unchanged size, mtime, ctime and inode (bit rot on the
        disk, or a same-size write within one timestamp tick of the memo on filesystems with coarse clocks).
        Only `verify` (`boothflow cache verify`) finds those.
        """
        path = self.path(stage, key)
        read = _read_manifest(path)
        if read is None:
            return None
        manifest, fingerprint = read
        files = manifest["files"]
        stats = {name: file_stat(path / name) for name in files}  # before any hashing: a later write shows
        if any(stats[name] is None or stats[name][0] != meta["size"] for name, meta in files.items()):
            return None
        memo = _read_memo(path, fingerprint)
        changed = [name for name in files if memo.get(name) != stats[name]]
        if any(file_sha256(path / name) != files[name]["sha256"] for name in changed):
            return None
        if changed:
            _write_memo(path, fingerprint, stats)
        return manifest

    def is_complete(self, stage: str, key: str) -> bool:
        return self.manifest(stage, key) is not None

    def get(self, stage: str, key: str) -> Entry | None:
        manifest = self.manifest(stage, key)
        return None if manifest is None else Entry(stage, key, self.path(stage, key), manifest, created=False)

    def get_or_create(
        self,
        stage: str,
        key: str,
        build: Callable[[Path], dict[str, Any]],
        config: dict[str, Any] | None = None,
    ) -> Entry:
        """Return the complete entry for `key`, building it with `build(folder) -> info` if missing.

        `build` writes into a private `.partial-*` folder; the manifest (files, sizes, sha256, seconds,
        versions, config, info) and the stat memo are written last and the folder renamed into place (a rename
        keeps the files' inodes and times), so readers see a whole entry or none. Under the key's lock, a second
        process waits and then reuses the first one's entry.
        """
        with self.lock(stage, key):
            existing = self.get(stage, key)
            if existing is not None:
                return existing
            final = self.path(stage, key)
            clear_partials(final)  # a killed writer's; we hold the key's lock
            with atomic_folder(final, replace=True) as partial:  # replaces an entry whose manifest check failed
                started = time.monotonic()
                info = build(partial)
                stats = {str(f.relative_to(partial)): file_stat(f) for f in sorted(partial.rglob("*")) if f.is_file()}
                manifest = {
                    "stage": stage,
                    "key": key,
                    "created_at": time.time(),
                    "seconds": round(time.monotonic() - started, 3),
                    "versions": package_versions(),
                    "config": config or {},
                    "info": info,
                    "files": {
                        name: {"size": stat[0], "sha256": file_sha256(partial / name)} for name, stat in stats.items()
                    },
                }
                text = json.dumps(manifest, indent=1, sort_keys=True).encode()
                (partial / MANIFEST).write_bytes(text)
                _write_memo(partial, hashlib.sha256(text).hexdigest(), stats)
        return Entry(stage, key, final, manifest, created=True)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry folder under the root, complete or not, for `boothflow cache ls` and `verify`."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                files = [f for f in entry.rglob("*") if f.is_file()]
                manifest_file = entry / MANIFEST
                yield {
                    "stage": stage_dir.name,
                    "key": entry.name,
                    "complete": manifest_file.is_file() and ".partial-" not in entry.name,
                    "bytes": sum(f.stat().st_size for f in files),
                    "modified": max((f.stat().st_mtime for f in files), default=entry.stat().st_mtime),
                }

    def verify(self, stage: str | None = None, progress: Callable[[int, int], None] | None = None) -> Verification:
        """Re-hash every file of every complete entry (of `stage`, or all) against its manifest: the one check
        that sees bytes changed under an unchanged stat. `progress(done, total)` counts bytes. An intact entry
        gets a fresh stat memo; a damaged one loses its memo, so the next lookup finds it missing and rebuilds it.
        """
        found = [(e["stage"], e["key"]) for e in self.entries() if e["complete"] and stage in (None, e["stage"])]
        manifests = {(s, k): _read_manifest(self.path(s, k)) for s, k in found}
        total = sum(m["size"] for read in manifests.values() if read for m in read[0]["files"].values())
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        damaged: list[Damage] = []
        for (s, k), read in manifests.items():
            if read is None:
                damaged.append(Damage(s, k, MANIFEST, "unreadable"))
                continue
            damaged += self._verify_entry(s, k, *read, advance)
        return Verification(len(found), total, damaged)

    def _verify_entry(
        self, stage: str, key: str, manifest: dict[str, Any], fingerprint: str, advance: Callable[[int], None]
    ) -> list[Damage]:
        path, damaged = self.path(stage, key), []
        stats = {name: file_stat(path / name) for name in manifest["files"]}  # before hashing, as a lookup takes them
        for name, meta in manifest["files"].items():
            stat = stats[name]
            if stat is None or stat[0] != meta["size"]:
                advance(meta["size"])  # nothing to read: the bar still counts the bytes the manifest promised
                problem = "missing" if stat is None else f"{stat[0]} bytes, the manifest says {meta['size']}"
            elif file_sha256(path / name, advance) != meta["sha256"]:
                problem = "bytes differ from the manifest's sha256"
            else:
                continue
            damaged.append(Damage(stage, key, name, problem))
        if damaged:
            _forget_memo(path)
        else:
            _write_memo(path, fingerprint, stats)
        return damaged
