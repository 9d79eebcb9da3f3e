"""Content-addressed stage store: `<root>/<stage>/<key>/` entries committed atomically with a manifest.

An entry counts only when its manifest exists and every file it lists matches, so a killed or failed
writer never leaves anything a rerun would trust. One lock per key keeps two runs from computing it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.core.atomic import atomic_folder, clear_partials

MANIFEST = "manifest.json"
KEY_LENGTH = 24
VERSIONED_PACKAGES = ("boothflow", "torch", "diffusers", "transformers", "peft", "pillow", "opencv-python-headless")


def digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(stage: str, code_version: int, config: dict[str, Any], **parts: Any) -> str:
    """The key of a stage (or item) output: everything that can change it, and no folder path."""
    return digest({"stage": stage, "code_version": code_version, "config": config, **parts})[:KEY_LENGTH]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """Share a committed item's file with a stage entry: a hard link costs no space; copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
        """The entry's manifest when the entry is complete and intact, else None."""
        path = self.path(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name, meta in files.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["size"] or file_sha256(file) != meta["sha256"]:
                return None
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
        versions, config, info) is written last and the folder renamed into place, so readers see a whole
        entry or none. Under the key's lock, a second process waits and then reuses the first one's entry.
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
                manifest = {
                    "stage": stage,
                    "key": key,
                    "created_at": time.time(),
                    "seconds": round(time.monotonic() - started, 3),
                    "versions": package_versions(),
                    "config": config or {},
                    "info": info,
                    "files": {
                        str(f.relative_to(partial)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                        for f in sorted(partial.rglob("*"))
                        if f.is_file()
                    },
                }
                (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return Entry(stage, key, final, manifest, created=True)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry folder under the root, complete or not, for `boothflow cache ls`."""
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
