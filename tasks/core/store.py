"""Content-addressed stage store: `<root>/<stage>/<key>/` entries committed atomically with a manifest.

An entry counts only when its manifest exists and every file it lists matches, so a killed or failed
writer never leaves anything a rerun would trust. One lock per key keeps two runs from computing it twice.
A lookup proves "matches" with a stat per file against a memo written with the entry, so it reads no file data.
An entry found damaged is never deleted: it is renamed `<key>.damaged-<time>`, said in one log line, and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from tasks.core.atomic import atomic_folder, clear_partials
from tasks.core.faults import fault, kill_if_injected, kill_if_injected_after
from tasks.core.manifest import (
    MANIFEST,
    Damage,
    file_problem,
    file_sha256,
    file_stat,
    forget_memo,
    package_versions,
    read_manifest,
    read_memo,
    write_memo,
)
from tasks.core.progress import run_logger

if TYPE_CHECKING:
    from tasks.core.remote import Remote

KEY_LENGTH = 24
DAMAGED = ".damaged-"
NOT_STAGES = {"runs", "models", "sweeps", "nights", "published"}  # run records, presets, pages, published models
Build = Callable[[Path], dict[str, Any]]  # writes an entry's files into the folder given; returns its info


def digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(stage: str, code_version: int, config: dict[str, Any], **parts: Any) -> str:
    """The key of a stage (or item) output: everything that can change it, and no folder path."""
    return digest({"stage": stage, "code_version": code_version, "config": config, **parts})[:KEY_LENGTH]


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC as an OSError, or as the message of a library that wraps it (safetensors, torch)."""
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


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


class DiskFull(Exception):
    """The artifact root's disk filled while an entry was written; the partial entry is gone, the store intact."""

    def __init__(self, root: Path, stage: str, key: str, written: int) -> None:
        free = shutil.disk_usage(root).free
        self.item = f"{stage}/{key}"
        self.message = (
            f"no space left on the disk of the artifact root {root}: writing {stage}/{key} needed more than "
            f"{_gib(written)} ({_gib(free)} free now); free space there (`boothflow cache gc`) or point "
            "run.artifacts_root at a bigger disk, then rerun: finished stages are reused"
        )
        super().__init__(self.message)


class RemoteError(Exception):
    """The shared store (`run.store`) could not be read or written (endpoint, bucket, credentials, network); the
    message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteDamage(Exception):
    """A remote entry that is not to be trusted: a blob missing or not hashing to its manifest, or no manifest."""


@dataclass(frozen=True)
class Verification:
    """What a full check of the store saw: entries and bytes checked, and every damaged file."""

    entries: int
    bytes: int
    damaged: list[Damage]


class Store:
    """The artifact root's stage entries; no state beyond the folder itself. With a `remote` store shared by many
    machines, the artifact root is this machine's cache of it: a local miss downloads the remote entry, and an entry
    built here is committed to the remote store before it appears here, so each local copy equals the remote one."""

    def __init__(self, root: Path, remote: Remote | None = None) -> None:
        self.root = Path(root)
        self.remote = remote

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        """A per-key lock held through an open file: the OS drops it when its holder dies."""
        return self._lock("store", stage, key)

    def building(self, stage: str, key: str) -> FileLock:
        """The lock a run holds through the whole build of a stage entry (items, models and all); its own file, since
        the build takes the key's lock again to commit."""
        return self._lock("build", stage, key)

    def _lock(self, kind: str, stage: str, key: str) -> FileLock:
        locks = self.root / ".locks" / kind
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{stage}-{key}.lock")

    def inspect(self, stage: str, key: str) -> dict[str, Any] | list[Damage] | None:
        """The entry's manifest when it is complete and intact; what is wrong with it when its folder is there but
        is not; None when there is no folder.

        Every listed file must have its manifest size and the stat its memo recorded; a file whose stat
        differs (or an entry without a memo, made before memos existed) is re-hashed now and must match its
        sha256, and then the memo is brought up to date. So a warm lookup costs a stat per file, never a read.
        What a stat cannot see: bytes changed under an unchanged size, mtime, ctime and inode (bit rot on the
        disk, or a same-size write within one timestamp tick of the memo on filesystems with coarse clocks).
        Only `verify` (`boothflow cache verify`) finds those. Files the manifest does not list are not looked at.
        """
        path = self.path(stage, key)
        read = read_manifest(path)
        if read is None:
            return [Damage(stage, key, MANIFEST, "missing or unreadable")] if path.is_dir() else None
        manifest, fingerprint = read
        files = manifest["files"]
        stats = {name: file_stat(path / name) for name in files}  # before any hashing: a later write shows
        memo = read_memo(path, fingerprint)
        damaged = [
            Damage(stage, key, name, problem)
            for name, meta in files.items()
            if (problem := file_problem(path / name, meta, stats[name], memo.get(name) != stats[name], None))
        ]
        if damaged:
            return damaged
        if any(memo.get(name) != stats[name] for name in files):
            write_memo(path, fingerprint, stats)
        return manifest

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The entry's manifest when the entry is complete and intact, else None (see `inspect`)."""
        found = self.inspect(stage, key)
        return found if isinstance(found, dict) else None

    def is_complete(self, stage: str, key: str) -> bool:
        return self.manifest(stage, key) is not None

    def get(self, stage: str, key: str, fetch: bool = True) -> Entry | None:
        """The intact entry, or None; a damaged one is first set aside (under the key's lock, checked again there,
        since another run may have set it aside and rebuilt it meanwhile). A local miss is downloaded from the remote
        store when it holds the entry (unless not `fetch`)."""
        found = self.inspect(stage, key)
        if isinstance(found, list) or (found is None and fetch and self.remote is not None):
            with self.lock(stage, key):
                found = self._set_aside_if_damaged(stage, key)
                if found is None and fetch:
                    found = self._fetch(stage, key)
        return None if found is None else Entry(stage, key, self.path(stage, key), found, created=False)

    def in_remote(self, stage: str, key: str) -> bool:
        return self.remote is not None and self.remote.manifest(stage, key) is not None

    def _fetch(self, stage: str, key: str) -> dict[str, Any] | None:
        """Hold the key's lock. Download the remote entry into a partial folder that becomes the entry once whole
        (a killed download leaves only the partial, which no reader trusts and the next writer clears); None when
        there is no remote entry, or one that is not to be trusted (said in a log line: the entry is built here)."""
        text = self.remote.manifest(stage, key) if self.remote is not None else None
        if text is None:
            return None
        final = self.path(stage, key)
        clear_partials(final)
        try:
            with atomic_folder(final, last=MANIFEST) as partial:
                return self._adopt(stage, key, partial, text)
        except RemoteDamage as damage:
            run_logger().warning("store entry %s/%s in %s is not used: %s", stage, key, self.remote.url, damage)
            return None

    def _adopt(self, stage: str, key: str, partial: Path, text: bytes) -> dict[str, Any]:
        """Make `partial` the remote entry whose manifest is `text`: download what it lacks, drop what it does not
        list, write the manifest and the stat memo."""
        try:
            manifest = json.loads(text)
            files = manifest["files"]
        except (ValueError, KeyError, TypeError):
            raise RemoteDamage(f"its {MANIFEST} is unreadable") from None
        if outside := [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]:
            raise RemoteDamage(f"its {MANIFEST} names a file outside the entry: {outside[0]}")
        self.remote.download(stage, key, files, partial)
        for stale in [f for f in partial.rglob("*") if f.is_file() and str(f.relative_to(partial)) not in files]:
            stale.unlink()
        (partial / MANIFEST).write_bytes(text)
        write_memo(partial, hashlib.sha256(text).hexdigest(), {name: file_stat(partial / name) for name in files})
        return manifest

    def _set_aside_if_damaged(self, stage: str, key: str) -> dict[str, Any] | None:
        """Hold the key's lock. The manifest of an intact entry; a damaged entry is renamed `<key>.damaged-<time>`
        (kept for the user to look at, listed by `cache ls`, removed only by `cache gc --damaged`) and said in one
        log line, which names the first damaged file; then None, as for a missing entry."""
        found = self.inspect(stage, key)
        if not isinstance(found, list):
            return found
        path = self.path(stage, key)
        aside = path.with_name(f"{key}{DAMAGED}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}")
        path.rename(aside)
        first, more = found[0], f" and {len(found) - 1} more file(s)" if len(found) > 1 else ""
        run_logger().warning(
            "damaged cache entry %s/%s: %s %s%s; kept aside as %s and rebuilt",
            stage, key, first.file, first.problem, more, aside.name,
        )  # fmt: skip
        return None

    def get_or_create(
        self,
        stage: str,
        key: str,
        build: Build,
        config: dict[str, Any] | None = None,
    ) -> Entry:
        """Return the complete entry for `key`, building it with `build(folder) -> info` if missing.

        `build` writes into a private `.partial-*` folder; the manifest (files, sizes, sha256, seconds,
        versions, config, info) and the stat memo are written last and the folder renamed into place (a rename
        keeps the files' inodes and times), so readers see a whole entry or none. Every file is flushed to the disk
        before the manifest, the manifest before its folder, all of it before the rename, and then the rename,
        so not even a power cut leaves an entry with missing bytes. Under the key's lock, a second process waits
        and then reuses the first one's entry.
        """
        with self.lock(stage, key):
            existing = self._set_aside_if_damaged(stage, key) or self._fetch(stage, key)
            if existing is not None:
                return Entry(stage, key, self.path(stage, key), existing, created=False)
            final = self.path(stage, key)
            clear_partials(final)  # a killed writer's; we hold the key's lock
            with atomic_folder(final, last=MANIFEST) as partial:  # a failed build leaves no folder behind
                try:
                    manifest = self._write_entry(stage, key, partial, build, config)
                except Exception as err:
                    if not _is_disk_full(err):
                        raise
                    raise DiskFull(self.root, stage, key, _folder_bytes(partial)) from None
                if self.remote is not None:
                    manifest = self._publish(stage, key, partial, manifest)
                kill_if_injected(f"{stage}:before-rename")
        kill_if_injected_after(f"{stage}:after")
        return Entry(stage, key, final, manifest, created=True)

    def _publish(self, stage: str, key: str, partial: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Commit the entry built in `partial` to the remote store; when another machine committed it first, make
        `partial` that machine's entry (the remote store's is the only one there is)."""
        winner = self.remote.publish(stage, key, partial, (partial / MANIFEST).read_bytes())
        if winner is None:
            return manifest
        try:
            return self._adopt(stage, key, partial, winner)
        except RemoteDamage as damage:
            message = f"{stage}/{key} in {self.remote.url} was committed by another machine and is damaged ({damage})"
            raise RemoteError(f"{message}; `boothflow cache verify --remote` lists what is wrong") from None

    def _write_entry(
        self, stage: str, key: str, partial: Path, build: Build, config: dict[str, Any] | None
    ) -> dict[str, Any]:
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
            "files": {name: {"size": stat[0], "sha256": file_sha256(partial / name)} for name, stat in stats.items()},
        }
        kill_if_injected(f"{stage}:before-manifest")
        if fault("disk_full") == stage:  # as the manifest write would fail on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / MANIFEST))
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        (partial / MANIFEST).write_bytes(text)
        write_memo(partial, hashlib.sha256(text).hexdigest(), stats)
        return manifest

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry folder under the root, complete or not, for `boothflow cache ls` and `verify`: its state is
        complete (a manifest; not checked here), damaged (set aside), partial (being written, or a killed writer's)
        or incomplete (anything else, e.g. training checkpoints)."""
        if not self.root.is_dir():
            return
        stage_dirs = (p for p in self.root.iterdir() if p.is_dir() and p.name not in NOT_STAGES)
        for stage_dir in sorted(p for p in stage_dirs if not p.name.startswith(".")):
            for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                files = [f for f in entry.rglob("*") if f.is_file()]
                yield {
                    "stage": stage_dir.name,
                    "key": entry.name,
                    "state": _state(entry),
                    "bytes": sum(f.stat().st_size for f in files),
                    "modified": max((f.stat().st_mtime for f in files), default=entry.stat().st_mtime),
                }

    def verify(self, stage: str | None = None, progress: Callable[[int, int], None] | None = None) -> Verification:
        """Re-hash every file of every complete entry (of `stage`, or all) against its manifest: the one check
        that sees bytes changed under an unchanged stat. `progress(done, total)` counts bytes. An intact entry
        gets a fresh stat memo; a damaged one loses its memo, so the next lookup re-hashes it and sets it aside.
        """
        complete = (e for e in self.entries() if e["state"] == "complete")
        found = [(e["stage"], e["key"]) for e in complete if stage in (None, e["stage"])]
        manifests = {(s, k): read_manifest(self.path(s, k)) for s, k in found}
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
            if problem := file_problem(path / name, meta, stat, rehash=True, progress=advance):
                damaged.append(Damage(stage, key, name, problem))
        if damaged:
            forget_memo(path)
        else:
            write_memo(path, fingerprint, stats)
        return damaged


def _state(folder: Path) -> str:
    if DAMAGED in folder.name:
        return "damaged"
    if ".partial-" in folder.name:
        return "partial"
    return "complete" if (folder / MANIFEST).is_file() else "incomplete"
