"""Serving a cached train entry from the shared store (`run.store`) against a local hit.

Machine A commits a train entry of `--gib` GiB (its weights stand-in: random bytes, which no compression shrinks) to
an S3 endpoint; machine B, with an empty artifact root, looks the key up: it downloads the entry, hashing every blob
against the manifest, and commits it locally; B's next lookups are local hits (a stat per file). The endpoint is
moto's S3 server on 127.0.0.1, in this process, holding objects in memory: the figures measure moto over loopback,
not S3 or its network. Both artifact roots lie under /dev/shm where there is one, so the disk is not what is timed.
Usage: .venv/bin/python benchmarks/shared_store.py [--gib 2] [--repeats 3] [--out benchmarks/RESULTS.md]
`--quick`: 8 MiB, once each (the suite runs it so the script never rots).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from results import RESULTS, write_section

from tasks.core.remote import Remote
from tasks.core.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from object_store import BUCKET, moto_endpoint  # the suite's endpoint, started the suite's way

KEY = "0" * 24
CHUNK = 64 * 2**20


def train_entry(size: int):
    """A build that writes what a train entry holds, in the size asked: a small metrics file and `size` bytes."""

    def build(folder: Path) -> dict:
        (folder / "metrics.csv").write_text("step,loss\n1,0.5\n")
        with (folder / "weights.bin").open("wb") as out:
            for left in range(size, 0, -CHUNK):
                out.write(os.urandom(min(CHUNK, left)))
        return {"items": 1}

    return build


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def measure(size: int, repeats: int, work: Path) -> dict[str, float]:
    """Seconds: A's commit (build and upload), B's download-and-commit (median), B's local hit (median), and a plain
    download of the entry's big blob by s3fs (what any client of this endpoint pays for the bytes)."""
    with moto_endpoint() as endpoint:
        url = f"s3://{BUCKET}/benchmark-{uuid.uuid4().hex}"  # a store of its own, whatever the endpoint holds
        options = {"endpoint_url": endpoint, "config_kwargs": {"read_timeout": 600}}
        a = Store(work / "a", Remote(url, options))
        upload, made = timed(lambda: a.get_or_create("train", KEY, train_entry(size)))
        blob = a.remote.blob_path(made.manifest["files"]["weights.bin"]["sha256"])
        plain, _ = timed(lambda: a.remote.fs.get_file(blob, str(work / "plain.bin")))
        (work / "plain.bin").unlink()
        downloads, hits = [], []
        for _ in range(repeats):
            b = Store(work / "b", Remote(url, options))
            seconds, entry = timed(lambda b=b: b.get("train", KEY))
            assert entry is not None and not entry.created
            downloads.append(seconds)
            hits += [timed(lambda b=b: b.get("train", KEY))[0] for _ in range(repeats)]
            shutil.rmtree(work / "b")
        return {"commit": upload, "download": statistics.median(downloads), "hit": statistics.median(hits),
                "plain": plain}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = 8 * 2**20 if args.quick else int(args.gib * 2**30)
    repeats = 1 if args.quick else args.repeats
    where = "/dev/shm" if Path("/dev/shm").is_dir() else None
    tempfile.tempdir = where  # moto spools what it receives into temporary files: those too
    with tempfile.TemporaryDirectory() as work:
        figures = measure(size, repeats, Path(work))
    rate = size / 2**20 / figures["download"]
    lines = [
        "# Shared store: a cached train entry from the remote store vs a local hit",
        "",
        f"`benchmarks/shared_store.py{' --quick' if args.quick else ''}`: one train entry of {size / 2**30:.2f} GiB "
        f"(random bytes) committed by machine A to moto's S3 server over loopback, then looked up by machine B "
        f"({repeats} time(s) from an empty root, each followed by {repeats} local hit(s)); {platform.machine()}, "
        f"{os.cpu_count()} cores, roots on {where or 'the temp folder'}. This measures moto over loopback (one "
        "Python process that spools what it receives to temporary files, here in memory; the client's read timeout "
        "raised to 600 s, as moto assembles a multipart upload in one request), not S3.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| A: build, upload the blobs, commit the manifest | {figures['commit']:.2f} |",
        f"| B: remote hit (download, hash-check, commit locally; median) | {figures['download']:.2f} |",
        f"| B: local hit (median) | {figures['hit']:.4f} |",
        f"| s3fs `get_file` of the same {size / 2**30:.2f} GiB blob, nothing else | {figures['plain']:.2f} |",
        "",
        f"A remote hit moved {rate:.0f} MiB/s: {figures['download'] / figures['plain']:.2f}x the plain download of its "
        f"bytes (the rest: the sha256 of every blob, the local commit); a local hit took "
        f"{figures['hit'] * 1000:.2f} ms (a stat per file).",
    ]
    write_section("shared-store", lines, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
