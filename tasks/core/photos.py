"""Instance photos at a URL (`data.instance_dir = "s3://bucket/subjects/rex"`), mirrored into the artifact root, so a
worker needs no shared filesystem and the stages read a local folder with the same checks as any other.

The mirror is `<root>/.photos/<digest of the URL>/`, and beside it `<digest>.json`, each file's version at the URL when
it was downloaded: a file is downloaded when its size or its version at the URL
(ETag, or modification time) differs from what the mirror holds, through a temporary name, and given the URL's
modification time, so `data.settle_minutes` holds back a photo that was uploaded a moment ago; a file gone from the
URL goes from the mirror. Keys hash the files' bytes, never the URL, so the same photos key the same entries wherever
they lie.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock

from tasks.core.progress import track
from tasks.core.store import digest

MIRRORS = ".photos"  # a dot-folder of the artifact root: never a stage, never served


class PhotosUnreachable(Exception):
    """The URL could not be listed or read; the message is one line that names data.instance_dir."""


def mirror_of(url: str, root: Path) -> Path:
    return Path(root) / MIRRORS / digest(url)[:24]


def listing(url: str, options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every file under `url`, by its path relative to it, with its size, version and modification time."""
    try:
        fs, base = fsspec.core.url_to_fs(url, **(options or {}))
        found = fs.find(base, detail=True)
    except Exception as err:
        raise PhotosUnreachable(f"data.instance_dir = {url!r}: could not list it ({type(err).__name__}: {err}); check "
                                "the URL, run.store_options and the credentials") from None  # fmt: skip
    files = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
        files[path[len(base) :].lstrip("/")] = {"size": info["size"], "version": str(version or uuid.uuid4()),
                                                "mtime": _timestamp(info), "path": path}  # fmt: skip
    return {name: meta for name, meta in files.items() if name and not name.endswith("/")}


def _timestamp(info: dict[str, Any]) -> float | None:
    when = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(when, datetime):
        return when.timestamp()
    return float(when) if isinstance(when, int | float) else None


def mirror(url: str, root: Path, options: dict[str, Any] | None = None) -> Path:
    """Bring the mirror of `url` under `root` up to date (one process at a time) and return its folder."""
    target = mirror_of(url, root)
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_suffix(".lock")):
        wanted = listing(url, options)
        record = target.with_suffix(".json")
        versions = _versions(record)
        stale = [name for name, meta in wanted.items() if not _current(target / name, meta, versions.get(name))]
        fs, _ = fsspec.core.url_to_fs(url, **(options or {}))
        for name in track(stale, len(stale), f"download photos from {url}"):
            local = target / name
            local.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.download")  # outside the folder
            try:
                fs.get_file(wanted[name]["path"], str(temp))
            except Exception as err:
                temp.unlink(missing_ok=True)
                raise PhotosUnreachable(f"data.instance_dir = {url!r}: could not read {name} ({type(err).__name__}: "
                                        f"{err})") from None  # fmt: skip
            if wanted[name]["mtime"] is not None:
                os.utime(temp, (wanted[name]["mtime"], wanted[name]["mtime"]))
            os.replace(temp, local)
            versions[name] = wanted[name]["version"]
        for gone in [f for f in target.rglob("*") if f.is_file() and str(f.relative_to(target)) not in wanted]:
            gone.unlink()
        record.write_text(json.dumps({name: versions[name] for name in wanted}))
    return target


def _versions(record: Path) -> dict[str, str]:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return {}


def _current(local: Path, meta: dict[str, Any], version: str | None) -> bool:
    return version == meta["version"] and local.is_file() and local.stat().st_size == meta["size"]
