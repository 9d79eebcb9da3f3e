"""Preprocess stage: validate, orient, crop and resize every instance image into a square PNG.

Each source file is cached by its content and the settings, so a rerun touches nothing and a new image
costs one image; unusable files are recorded with a reason (and cached too), never silently dropped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import pandas as pd

from tasks.core.atomic import link_or_copy
from tasks.core.config import PreprocessSection, RunConfig
from tasks.core.hash_memo import HashMemo
from tasks.core.manifest import file_sha256
from tasks.core.progress import track
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, digest, stage_key
from tasks.sd import imaging

STAGE = "preprocess"
ITEMS = "preprocess-items"
COLUMNS = ["source", "source_sha256", "item_key", "status", "reason", "original_size", "crop_box", "crop_mode"]
CODE_VERSION = 1
SIDECAR_SUFFIXES = {".txt"}


@dataclass(frozen=True)
class SourceFile:
    """One file found in the instance folder: its path relative to the folder and its content hash.

    `problem` is set when the file cannot even be read as a candidate (a symlink out of the folder,
    a duplicate of an earlier file, unreadable); such files are rejected without being opened.
    """

    relpath: str
    sha256: str | None
    problem: str | None = None


@dataclass(frozen=True)
class PreprocessInputs:
    instance_dir: Path
    files: tuple[SourceFile, ...]
    min_images: int
    waiting: tuple[str, ...] = ()  # files modified too recently (still being copied?): left for the next run

    @classmethod
    def of(cls, config: RunConfig) -> PreprocessInputs:
        """The instance folder as it is now: every file scanned by `scan`, hashed only when it changed since a run with
        this artifact root last hashed it; files modified less than `data.settle_minutes` ago wait, unread."""
        data = config.data
        waiting = recently_modified(data.instance_dir, data.settle_seconds()) if data.settle_seconds() else ()
        with HashMemo(config.run.artifacts_root) as memo:
            files = scan(data.instance_dir, memo.sha256, skip=frozenset(waiting))
        return cls(data.instance_dir, files, data.min_images, waiting)

    @property
    def fingerprint(self) -> str:
        """The dataset's identity: sorted (relative path, sha256) of every file; no folder path."""
        return digest([(f.relpath, f.sha256, f.problem) for f in self.files])


def _is_ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.suffix.lower() in SIDECAR_SUFFIXES


def scan(
    instance_dir: Path, sha256: Callable[[Path], str] = file_sha256, skip: frozenset[str] = frozenset()
) -> tuple[SourceFile, ...]:
    """Every candidate file under `instance_dir` but those in `skip` (relative paths), sorted, hashed by `sha256`,
    with scan-level problems marked."""
    candidates = _candidates(instance_dir)
    real_root = Path(instance_dir).resolve()
    first_by_hash: dict[str, str] = {}
    return tuple(
        _examine(candidates[rel], rel, real_root, first_by_hash, sha256)
        for rel in sorted(candidates)
        if rel not in skip
    )


def recently_modified(instance_dir: Path, seconds: float) -> tuple[str, ...]:
    """The candidate files modified in the last `seconds`, sorted: perhaps still being copied. A file dated further
    in the future than that has a wrong clock behind it, not a copy in progress, and is not held back."""
    now, candidates = time.time(), _candidates(instance_dir)
    return tuple(rel for rel in sorted(candidates) if now - seconds < _modified(candidates[rel]) < now + seconds)


def _candidates(instance_dir: Path) -> dict[str, Path]:
    """Every file under `instance_dir` that may be an image, by its path relative to the folder."""
    root = Path(instance_dir)
    if not root.is_dir():
        raise StageError(STAGE, "instance folder not found; set data.instance_dir to a folder of images", str(root))
    candidates: dict[str, Path] = {}
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames + [d for d in dirnames if (Path(folder) / d).is_symlink()]:
            path = Path(folder) / name
            if not _is_ignored(path):
                candidates[path.relative_to(root).as_posix()] = path
    return candidates


def _modified(path: Path) -> float:
    """When the file (a symlink's target) last changed; a file that cannot be read counts as settled, so it is
    examined and rejected with its reason."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _examine(
    path: Path, relpath: str, real_root: Path, first_by_hash: dict[str, str], sha256: Callable[[Path], str]
) -> SourceFile:
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:  # e.g. names from a zip made on Windows; they cannot go into tables or keys
        shown = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return SourceFile(shown, None, "file name is not valid UTF-8; rename the file")
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            return SourceFile(relpath, None, "broken symlink")
        if not target.is_relative_to(real_root):
            return SourceFile(relpath, None, "symlink leads outside the instance folder")
        if target.is_dir():
            return SourceFile(relpath, None, "symlinked folder (its files are scanned where they are)")
    try:
        sha = sha256(path)
    except OSError as err:
        return SourceFile(relpath, None, f"cannot read: {err.strerror or err}")
    if sha in first_by_hash:
        return SourceFile(relpath, sha, f"duplicate of {first_by_hash[sha]}")
    first_by_hash[sha] = relpath
    return SourceFile(relpath, sha)


def stage_key_for(cfg: PreprocessSection, inputs: PreprocessInputs) -> str:
    return stage_key(STAGE, CODE_VERSION, cfg.keyed(), min_images=inputs.min_images, dataset=inputs.fingerprint)


def item_key(cfg: PreprocessSection, source_sha256: str) -> str:
    """Per-image key: the source bytes and every setting that changes the output, never the file name.

    Face crops also depend on the face detector, so its OpenCV version is part of their key.
    """
    detector = cv2.__version__ if cfg.crop == "face" else None
    return stage_key(ITEMS, CODE_VERSION, cfg.keyed(), source=source_sha256, detector=detector)


def _build_item(cfg: PreprocessSection, source: Path, sha256: str):
    def build(folder: Path) -> dict[str, Any]:
        if file_sha256(source) != sha256:
            raise StageError(STAGE, "file changed while the run was reading it; run again", str(source))
        try:
            prepared = imaging.prepare(source, cfg.resolution, cfg.crop, cfg.min_side, cfg.max_pixels, cfg.face_margin)
        except imaging.Rejected as rejected:
            return {"status": "rejected", "reason": str(rejected)}
        prepared.image.save(folder / "image.png", format="PNG")
        return {
            "status": "ok",
            "reason": prepared.note,
            "original_size": list(prepared.original_size),
            "crop_box": list(prepared.crop_box),
            "crop_mode": prepared.crop_mode,
        }

    return build


def build(cfg: PreprocessSection, inputs: PreprocessInputs, store: Store, key: str) -> StageResult:
    """Preprocess every file of `inputs`, reusing cached items; fail only when too few images are usable."""
    rows: list[dict[str, Any]] = []
    processed = cached = 0
    for source in track(inputs.files, len(inputs.files), "preprocess images"):
        row: dict[str, Any] = {"source": source.relpath, "source_sha256": source.sha256}
        if source.problem:
            rows.append({**row, "status": "rejected", "reason": source.problem})
            continue
        ikey = item_key(cfg, source.sha256)
        build = _build_item(cfg, inputs.instance_dir / source.relpath, source.sha256)
        try:
            entry = store.get_or_create(ITEMS, ikey, build, cfg.keyed())
        except StageError:
            raise
        except Exception as err:
            raise StageError(STAGE, f"unexpected {type(err).__name__}: {err}", source.relpath) from err
        processed += entry.created
        cached += not entry.created
        rows.append({**row, "item_key": ikey, **entry.info})

    table = pd.DataFrame(rows, columns=COLUMNS)  # one column order, whether items were built now or cached
    usable = table[table["status"] == "ok"]
    rejected = table[table["status"] == "rejected"]
    if len(usable) < inputs.min_images:
        listing = "; ".join(f"{r.source} ({r.reason})" for r in rejected.itertuples()) or "none"
        waiting = f"; {len(inputs.waiting)} more wait (modified too recently): the next run takes them" * bool(
            inputs.waiting
        )
        raise StageError(
            STAGE,
            f"only {len(usable)} usable images, data.min_images is {inputs.min_images}; "
            f"add images or lower data.min_images. Rejected: {listing}{waiting}",
            str(inputs.instance_dir),
        )

    def write(folder: Path) -> dict[str, Any]:
        images = folder / "images"
        images.mkdir()
        names = []
        for r in usable.itertuples():
            name = f"{r.source_sha256[:16]}.png"
            link_or_copy(store.path(ITEMS, r.item_key) / "image.png", images / name)
            names.append(f"images/{name}")
        table.assign(image=pd.Series(names, index=usable.index)).to_csv(folder / "items.csv", index=False)
        (folder / "settings.json").write_text(json.dumps(cfg.keyed(), indent=1, sort_keys=True))
        return {"items": processed + cached, "usable": len(usable), "rejected": len(rejected)}

    entry = store.get_or_create(STAGE, key, write, cfg.keyed())
    return StageResult(STAGE, key, entry.path, processed, cached, len(rejected))


stage = Stage(STAGE, "preprocess", stage_key_for, build, outputs={"preprocess_dir": "images"})
run = stage.run  # the plain function: cached entry or build
