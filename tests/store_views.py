"""What the shared-store tests read back: a training's resume state in the store, and a train entry's files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import s3fs

RUN_RECORDS = ("metrics.csv", "memory.json")  # a run's clock and memory (the losses are compared apart)


def checkpoints(endpoint: str, url: str) -> list[str]:
    """The checkpoint manifests the shared store at `url` holds: `<train key>/<name>.json`."""
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    base = f"{url.removeprefix('s3://')}/checkpoints/"
    return sorted(path.removeprefix(base) for path in fs.find(base))


def training(root: Path, key: str) -> tuple[dict[str, str], list[tuple[int, float]]]:
    """The train entry's files by sha256 (but its own records) and its losses by step."""
    files = json.loads((root / "train" / key / "manifest.json").read_text())["files"]
    losses = pd.read_csv(root / "train" / key / "metrics.csv")
    sums = {name: meta["sha256"] for name, meta in files.items() if name not in RUN_RECORDS}
    return sums, list(zip(losses["step"], losses["loss"], strict=True))
