"""A store that many machines share on object storage (`run.store`, e.g. s3://bucket/prefix), through fsspec.

It holds `blobs/<sha256>` (each file of each entry, named by its bytes) and `entries/<stage>/<key>.json` (the entry's
manifest, byte for byte the one an artifact root keeps as `<stage>/<key>/manifest.json`). Two machines may build one
entry at the same moment, and their bytes may differ (timings), so a file is uploaded only under the name of its own
sha256, where no other attempt can put other bytes, and the manifest is written last with a conditional write (S3's
If-None-Match, fsspec's mode "xb"): the first manifest wins and is the commit; a loser adopts the winner's entry. A
reader trusts an entry only when its manifest is there and each blob it downloads hashes to what the manifest says.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.callbacks import Callback

from tasks.core.faults import hold_if_injected, kill_if_injected
from tasks.core.manifest import MANIFEST, file_sha256
from tasks.core.progress import Reporter
from tasks.core.store import RemoteDamage, RemoteError, Store

if TYPE_CHECKING:
    from tasks.core.config import RunSection

SHOWN_FROM_BYTES = 64 * 2**20  # a transfer this large gets a progress bar


class _Advance(Callback):
    """fsspec's transfer callback, counting bytes into `advance(n)`."""

    def __init__(self, advance: Callable[[int], None] | None) -> None:
        super().__init__()
        self.advance = advance

    def relative_update(self, inc: int = 1) -> None:
        if self.advance is not None:
            self.advance(inc)


@contextlib.contextmanager
def _progress(total: int, description: str) -> Iterator[Callable[[int], None] | None]:
    """A progress reporter's `advance` for a transfer large enough to show, else None."""
    if total < SHOWN_FROM_BYTES:
        yield None
        return
    with Reporter(total, description) as reporter:
        yield reporter.advance


class Remote:
    """The shared store at `url`; every call that reaches it fails as a one-line RemoteError."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        options = {"use_listings_cache": False, **(options or {})}  # other machines write it: never a stale listing
        if self.url.startswith("file://"):  # a shared folder (NFS): make the folders that object storage does not need
            options.setdefault("auto_mkdir", True)
        with self._reaching("open"):
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **options)

    @contextlib.contextmanager
    def _reaching(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (FileExistsError, RemoteDamage):  # outcomes of the protocol, handled by the caller
            raise
        except Exception as err:
            raise RemoteError(f"run.store = {self.url!r}: could not {doing} ({type(err).__name__}: {err}); check the "
                              "URL, run.store_options (endpoint_url) and the AWS credentials") from None  # fmt: skip

    def manifest_path(self, stage: str, key: str) -> str:
        return f"{self.base}/entries/{stage}/{key}.json"

    def blob_path(self, sha256: str) -> str:
        return f"{self.base}/blobs/{sha256}"

    def summary_path(self, run_id: str) -> str:
        return f"{self.base}/runs/{run_id}/summary.json"

    def put_summary(self, run_id: str, text: bytes) -> None:
        """A run's summary, for a parent run (a sweep) on another machine; rewritten as the run goes on."""
        with self._reaching(f"write the summary of run {run_id}"):
            self.fs.pipe_file(self.summary_path(run_id), text)

    def summary(self, run_id: str) -> bytes | None:
        with self._reaching(f"read the summary of run {run_id}"):
            try:
                return self.fs.cat_file(self.summary_path(run_id))
            except FileNotFoundError:
                return None

    def check(self) -> None:
        """Reach the store once, before a run's first stage: a wrong endpoint or bucket fails here in one line."""
        with self._reaching("list it"):
            self.fs.ls(self.base.split("/")[0] or self.base, detail=False)

    def manifest(self, stage: str, key: str) -> bytes | None:
        """The committed manifest of an entry, or None when the store holds no such entry."""
        with self._reaching(f"read {stage}/{key}"):
            try:
                return self.fs.cat_file(self.manifest_path(stage, key))
            except FileNotFoundError:
                return None

    def keys(self) -> list[tuple[str, str]]:
        """Every committed entry, as (stage, key)."""
        with self._reaching("list its entries"):
            found = self.fs.glob(f"{self.base}/entries/*/*.json")
        return sorted((Path(path).parent.name, Path(path).stem) for path in found)

    def publish(self, stage: str, key: str, folder: Path, text: bytes) -> bytes | None:
        """Upload the entry in `folder` (its manifest `text`): its files as blobs the store lacks, then the manifest,
        conditionally. None when this one is the commit; the winner's manifest when another machine's came first."""
        files = json.loads(text)["files"]
        missing = {name: meta for name, meta in files.items() if not self._has_blob(meta)}
        total = sum(meta["size"] for meta in missing.values())
        with self._reaching(f"upload {stage}/{key}"), _progress(total, f"upload {stage}/{key}") as advance:
            for name, meta in missing.items():
                self.fs.put_file(str(folder / name), self.blob_path(meta["sha256"]), callback=_Advance(advance))
        kill_if_injected(f"{stage}:before-publish")
        hold_if_injected(f"{stage}:before-publish")
        with self._reaching(f"commit {stage}/{key}"):
            try:
                with self.fs.open(self.manifest_path(stage, key), "xb") as out:
                    out.write(text)
            except FileExistsError:
                return self.fs.cat_file(self.manifest_path(stage, key))
        return None

    def checkpoints_path(self, key: str) -> str:
        return f"{self.base}/checkpoints/{key}"

    def put_checkpoint(self, key: str, name: str, folder: Path) -> None:
        """A training's checkpoint (or sample weights), `name` under its checkpoints folder, written whole in `folder`:
        its files as blobs, then its manifest, which makes it count. A machine that resumes the training of entry
        train/`key` downloads it."""
        files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip
        with self._reaching(f"upload checkpoint {name} of train/{key}"):
            for relative, meta in files.items():
                if not self._has_blob(meta):
                    self.fs.put_file(str(folder / relative), self.blob_path(meta["sha256"]))
            self.fs.pipe_file(f"{self.checkpoints_path(key)}/{name}.json", json.dumps({"files": files}).encode())

    def checkpoints(self, key: str) -> dict[str, dict[str, dict[str, Any]]]:
        """The checkpoints of the training of train/`key` that the store holds whole: name -> its files."""
        base = self.checkpoints_path(key)
        with self._reaching(f"list the checkpoints of train/{key}"):
            found = {path.removeprefix(f"{base}/").removesuffix(".json"): json.loads(self.fs.cat_file(path))["files"]
                     for path in self.fs.find(base) if path.endswith(".json")}  # fmt: skip
        return dict(sorted(found.items()))

    def drop_checkpoints(self, key: str, names: list[str] | None = None) -> None:
        """Forget checkpoints of train/`key` (`names`, or all of them: its entry is committed); their blobs stay."""
        base = self.checkpoints_path(key)
        with self._reaching(f"remove checkpoints of train/{key}"):
            for name in names if names is not None else self.checkpoints(key):
                self.fs.rm_file(f"{base}/{name}.json")

    def _has_blob(self, meta: dict[str, Any]) -> bool:
        with self._reaching("look for a blob"):
            try:
                return self.fs.size(self.blob_path(meta["sha256"])) == meta["size"]
            except FileNotFoundError:
                return False

    def download(self, stage: str, key: str, files: dict[str, dict[str, Any]], folder: Path) -> None:
        """Each file's blob into `folder`, through a temporary name renamed into place once its sha256 matches (so a
        file that a hard link shares with another entry is replaced, never written into); RemoteDamage when one is
        missing or does not match. A file already there with the right sha256 is kept."""
        wanted = {name: meta for name, meta in files.items() if not _holds(folder / name, meta)}
        total = sum(meta["size"] for meta in wanted.values())
        with _progress(total, f"download {stage}/{key}") as advance:
            for count, (name, meta) in enumerate(wanted.items(), 1):
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.download")
                if problem := self._fetch_blob(meta, temp, advance):
                    raise RemoteDamage(f"{name}: {problem}")
                os.replace(temp, target)
                kill_if_injected(f"{stage}:mid-download-{count}")

    def _fetch_blob(self, meta: dict[str, Any], temp: Path, advance: Callable[[int], None] | None) -> str | None:
        """Download one blob to `temp` and hash it; what is wrong with it (the file removed then), or None."""
        with self._reaching(f"download blob {meta['sha256']}"):
            try:
                self.fs.get_file(self.blob_path(meta["sha256"]), str(temp), callback=_Advance(advance))
            except FileNotFoundError:
                return f"blob {meta['sha256']} is missing"
        if file_sha256(temp) == meta["sha256"]:
            return None
        temp.unlink()
        return f"blob {meta['sha256']} does not hash to its name"

    def entries(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Every committed entry: (stage, key, its manifest, or None when that is unreadable)."""
        found = []
        for stage, key in self.keys():
            try:
                manifest = json.loads(self.manifest(stage, key) or b"")
                manifest = manifest if all(isinstance(m["sha256"], str) for m in manifest["files"].values()) else None
            except (ValueError, KeyError, TypeError, AttributeError):
                manifest = None
            found.append((stage, key, manifest))
        return found

    def verify(self, progress: Callable[[int, int], None] | None = None) -> tuple[int, list[str]]:
        """Download and hash every blob that a manifest names, each once: (entries checked, what is wrong with them,
        a line each). The one check that sees a blob changed or lost after its entry was committed. `progress(done,
        total)` counts bytes."""
        entries, problems = self.entries(), []
        blobs = {meta["sha256"]: meta for _, _, manifest in entries if manifest for meta in manifest["files"].values()}
        total, done = sum(meta["size"] for meta in blobs.values()), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        found = {}
        with tempfile.TemporaryDirectory() as scratch:
            for sha, meta in blobs.items():  # one at a time: never the whole store on this disk
                found[sha] = self._fetch_blob(meta, Path(scratch) / sha, advance)
                (Path(scratch) / sha).unlink(missing_ok=True)
        for stage, key, manifest in entries:
            if manifest is None:
                problems.append(f"{stage}/{key}: {MANIFEST} unreadable")
                continue
            problems += [f"{stage}/{key}: {name}: {found[meta['sha256']]}" for name, meta in manifest["files"].items()
                         if found[meta["sha256"]]]  # fmt: skip
        return len(entries), problems


def _holds(path: Path, meta: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == meta["size"] and file_sha256(path) == meta["sha256"]


def open_store(run: RunSection) -> Store:
    """A run's store: its artifact root, backed by the shared store `run.store` when there is one."""
    return Store(run.artifacts_root, Remote(run.store, run.store_options) if run.store else None)
