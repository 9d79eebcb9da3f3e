"""The tables and records stages hand each other (items.csv, samples.csv, training.json), read as the next stage
needs them.

A missing or unreadable one means the upstream entry is not what this code expects: the error names the stage to rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.stage import StageError

KIND_LABELS = {"finetuned": "fine-tuned", "base": "base model", "checkpoint": "checkpoint"}
"""Sample kinds in the order tables and pages show them (checkpoints then go by step), with their names there."""
METRICS_FILE = "metrics.json"  # the evaluate stage's scores, as the report shows them


def read_rows(path: Path, upstream: str, reader: str) -> list[dict[str, str]]:
    """Rows as strings exactly as written (a prompt such as "NA" or "None" stays text)."""
    if not path.is_file():
        rerun = f"rerun `boothflow stage {upstream}`"
        raise StageError(reader, f"the {upstream} output lacks {path.name}; {rerun}", str(path))
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def read_json(path: Path, upstream: str, reader: str) -> dict[str, Any]:
    """A JSON record of an upstream entry (training.json, selection.json, metrics.json)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problem = "lacks" if not path.exists() else f"cannot read ({err})"
        raise StageError(reader, f"the {upstream} output {problem} {path.name}; rerun `boothflow stage {upstream}`",
                         str(path)) from err  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One generated image: which weights rendered it (kind, and step for checkpoints), its prompt and seed."""

    id: str
    kind: str
    step: int | None
    template: str
    prompt: str
    seed: int
    source: Path

    @property
    def group(self) -> tuple[str, int | None]:
        return self.kind, self.step


def read_samples(generate: Path, reader: str) -> list[Sample]:
    """The generate stage's samples.csv, in group order (fine-tuned, base, checkpoints by step), each pointing at
    its image; an image the table names but the entry lacks is an error naming it."""
    samples = []
    for row in read_rows(generate / "samples.csv", "generate", reader):
        step = int(float(row["step"])) if row["step"] else None
        source = generate / row["image"]
        if not source.is_file():
            raise StageError(reader, "the generate output lacks this image; rerun generate", str(source))
        samples.append(Sample(row["id"], row["kind"], step, row["template"], row["prompt"], int(row["seed"]), source))
    return in_group_order(samples)


def in_group_order(samples: list[Sample]) -> list[Sample]:
    order = list(KIND_LABELS)

    def rank(sample: Sample) -> tuple[int, int]:
        return order.index(sample.kind) if sample.kind in order else len(order), sample.step or 0

    return sorted(samples, key=rank)


def group_label(kind: str, step: int | None) -> str:
    return f"checkpoint step {step}" if kind == "checkpoint" else KIND_LABELS.get(kind, kind)
