"""A subject's published model: `<root>/published/<subject>/`, the one to serve, replaced by a night's model only when
that model passes the gate (`publish.metric` no worse than the published model's by more than `publish.tolerance`).

The folder is a symlink to a complete version folder (`published/.versions/<subject>-<time ns>/`: the model's files,
hard-linked from the store, and `published.json`, which night, which run, which key and the scores), swapped in one
rename: a reader that resolves the link once sees the old model or the new one, never part of either. A replaced
version stays an hour, for a reader that resolved it just before the swap; then it goes.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core.atomic import atomic_folder, link_or_copy
from tasks.stages.comparison import scores
from tasks.stages.report import report_facts

PUBLISHED = "published"
VERSIONS = ".versions"
RECORD = "published.json"
REPLACED_GRACE_S = 3600.0  # how long a replaced version stays, for a reader that resolved the link before the swap


@dataclass(frozen=True)
class Promotion:
    """What the gate decided for a subject's model tonight: published or kept, with both scores."""

    published: bool
    metric: str
    score: float | None
    before: float | None  # the published model's score; None when there was none (or no gate)
    why: str


def folder(root: Path, subject: str) -> Path:
    return Path(root) / PUBLISHED / subject


def current(root: Path, subject: str) -> dict[str, Any] | None:
    """The published model's record, or None when the subject has none yet."""
    try:
        return json.loads((folder(root, subject) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def every_record(root: Path) -> list[dict[str, Any]]:
    """The published model's record of every subject that has one."""
    base = Path(root) / PUBLISHED
    names = sorted(p.name for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []
    return [record for name in names if (record := current(root, name)) is not None]


def score(scores: dict[str, Any], metric: str) -> float | None:
    """A night row's score for a gate metric (`analyser`: the toy analyser's subject rate)."""
    value = scores.get("subject" if metric == "analyser" else metric)
    return float(value) if value is not None else None


def gate(metric: str, tolerance: float, new: float | None, published: dict[str, Any] | None) -> Promotion:
    """Whether a model scoring `new` replaces the published one (every metric here is better higher)."""
    if published is None:
        return Promotion(True, metric, new, None, "the subject's first model")
    if not metric:
        return Promotion(True, metric, new, None, "no gate (publish.metric is empty)")
    before = score(published.get("scores") or {}, metric)
    if before is None:
        return Promotion(True, metric, new, None, f"the published model has no {metric} score")
    if new is None:
        return Promotion(False, metric, None, before, f"no {metric} score tonight; the published model keeps its place")
    if new >= before - tolerance:
        return Promotion(True, metric, new, before, f"{metric} {new:.4g} >= {before:.4g} - {tolerance:g}")
    why = f"{metric} {new:.4g} < {before:.4g} - {tolerance:g}: kept, not published"
    return Promotion(False, metric, new, before, why)


def publish(root: Path, subject: str, model_dir: Path, record: dict[str, Any], promotion: Promotion) -> Path:
    """Make `model_dir` the subject's published model: a new complete version folder, then the symlink swapped to it
    in one rename. Returns the published folder."""
    versions = Path(root) / PUBLISHED / VERSIONS
    version = versions / f"{subject}-{time.time_ns()}"
    with atomic_folder(version, last=RECORD) as partial:
        for source in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
            target = partial / source.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source, target)
        full = {**record, "subject": subject, "promotion": asdict(promotion), "published_at": time.time()}
        (partial / RECORD).write_text(json.dumps(full, indent=1, default=str))
    link = folder(root, subject)
    swap = link.with_name(f".{subject}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(Path(VERSIONS) / version.name, swap)
    os.replace(swap, link)
    _prune(versions, subject, version)
    return link


def _versions(versions: Path, subject: str) -> list[Path]:
    """The subject's version folders (`<subject>-<time ns>`, and partial ones a killed publisher left), oldest
    first."""
    if not versions.is_dir():
        return []
    found = [(p, p.name.split(".partial-")[0].rpartition("-")) for p in versions.iterdir()]
    mine = [(int(ns), p) for p, (name, _, ns) in found if name == subject and ns.isdigit()]
    return [p for _, p in sorted(mine)]


def _prune(versions: Path, subject: str, newest: Path) -> None:
    """Versions of the subject replaced more than REPLACED_GRACE_S ago (never the published one), and partial ones
    as old."""
    mine, now = _versions(versions, subject), time.time()
    done = [p for p in mine if ".partial-" not in p.name]
    replaced = {old for old, successor in itertools.pairwise(done) if now - _made(successor) > REPLACED_GRACE_S}
    for old in replaced | {p for p in mine if ".partial-" in p.name and now - _made(p) > REPLACED_GRACE_S}:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def _made(version: Path) -> float:
    return int(version.name.split(".partial-")[0].rpartition("-")[2]) / 1e9


def forget(root: Path, subject: str) -> list[Path]:
    """Remove the subject's published model and every version of it; what was removed."""
    link, removed = folder(root, subject), []
    if link.is_symlink() or link.exists():
        link.unlink()
        removed.append(link)
    for version in _versions(Path(root) / PUBLISHED / VERSIONS, subject):
        shutil.rmtree(version, ignore_errors=True)
        removed.append(version)
    return removed


def promote(
    root: Path, subject: str, summary: dict[str, Any], metric: str, tolerance: float, night: str
) -> Promotion | None:
    """Gate a subject's model from its run's summary and publish it when it passes; None when the run made no model.
    The model already published (an unchanged subject) is not published again."""
    outputs = summary.get("outputs") or {}
    if not outputs.get("model_dir"):
        return None
    report = Path(outputs.get("report_html") or "")
    tonight = scores(report_facts(report.parent) if report.is_file() else None)
    published = current(root, subject)
    if published is not None and published.get("model_dir") == outputs["model_dir"]:
        before = score(published.get("scores") or {}, metric)
        return Promotion(True, metric, score(tonight, metric), before, "already the published model")
    promotion = gate(metric, tolerance, score(tonight, metric), published)
    if promotion.published:
        keys = {stage: facts.get("key") for stage, facts in (summary.get("stages") or {}).items()}
        record = {"night": night, "flow_run_id": summary["run"]["flow_run_id"], "model_dir": outputs["model_dir"],
                  "keys": keys, "scores": tonight}  # fmt: skip
        publish(root, subject, Path(outputs["model_dir"]), record, promotion)
    return promotion
