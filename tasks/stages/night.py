"""The morning summary of a night of subjects: one page (and the facts behind it) with a row per subject, failed
subjects first with their one-line cause, then each subject's stages (ran or cached), training time, the worker and
GPU it ran on, its metrics and a link to its report.

It reads what each subject's run summary and report already hold: no model loads here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core.atomic import atomic_folder
from tasks.stages import report_page
from tasks.stages.comparison import LEAK, METRICS, relative_link, scores
from tasks.stages.promotion import Promotion
from tasks.stages.report import report_facts

TEMPLATE = "night.html.j2"
SECTIONS = ("subjects",)
PAGE = "night.html"
FACTS = "night.json"


@dataclass(frozen=True)
class SubjectRun:
    """A subject as the night left it: its final Prefect state, the summary its run wrote (None when it never ran)
    and, for a subject that could not start, why."""

    name: str
    state: str
    summary: dict[str, Any] | None
    problem: str | None = None
    tries: int = 0  # how many times its run was started tonight (0: it never started)
    promotion: Promotion | None = None  # the gate's decision on its model (None: no model tonight)


def cause(subject: SubjectRun) -> str:
    """The failed subject's one line: where it failed (stage, item) and why; empty when it did not fail."""
    if subject.problem:
        return subject.problem
    error = (subject.summary or {}).get("error")
    if error:
        where = ", ".join(str(error[k]) for k in ("stage", "item") if error.get(k))
        return f"{where}: {error['message']}"
    return "" if subject.state == "Completed" else f"the run ended {subject.state} without a summary"


def state_line(row: dict[str, Any]) -> str:
    """A row's state as the CLI and the UI say it: `Completed (2 tries)`, or `Failed: <cause>`."""
    tries = f" ({row['tries']} tries)" if row.get("tries", 0) > 1 else ""
    return f"{row['state']}{tries}: {row['cause']}" if row["cause"] else f"{row['state']}{tries}"


def published_line(row: dict[str, Any]) -> str:
    """Whether the subject's model was published tonight, with the gate's numbers: `published`, `kept: dino 0.41 <
    0.45 - 0.02`; a dash without a model."""
    promoted = row.get("promotion")
    if not promoted:
        return "—"
    return f"published: {promoted['why']}" if promoted["published"] else f"kept: {promoted['why']}"


def _stages(summary: dict[str, Any] | None) -> list[dict[str, str]]:
    """Each stage the run reached: `ran` (with its items) or `cached` (or `failed`)."""
    shown = []
    for name, stage in ((summary or {}).get("stages") or {}).items():
        status = stage.get("status", "")
        if status == "skipped":
            continue
        text = f"ran {stage.get('items_processed') or 0}" if status == "ran" else status
        shown.append({"stage": name, "status": status, "text": text})
    return shown


def row(subject: SubjectRun, target: Path) -> dict[str, Any]:
    summary = subject.summary or {}
    train = (summary.get("stages") or {}).get("train") or {}
    report = summary.get("outputs", {}).get("report_html")
    facts = report_facts(Path(report).parent) if report and Path(report).is_file() else None
    return {
        "subject": subject.name,
        "state": subject.state,
        "failed": bool(cause(subject)),
        "cause": cause(subject),
        "stages": _stages(summary),
        "training_seconds": train.get("seconds") if train.get("status") == "ran" else None,
        "worker": (summary.get("run") or {}).get("worker") or "",
        "gpu": (summary.get("run") or {}).get("gpu") or "",
        "waiting": summary.get("waiting") or [],
        "tries": subject.tries,
        "promotion": asdict(subject.promotion) if subject.promotion else None,
        "metrics": scores(facts),
        "report": relative_link(Path(report), target) if facts else None,
    }


def write(title: str, subjects: list[SubjectRun], target: Path) -> dict[str, Any]:
    """Write `target/night.html` and `night.json`, failed subjects first; return the facts the artifacts show."""
    with atomic_folder(target, replace=True) as folder:
        rows = sorted((row(subject, target) for subject in subjects), key=lambda r: not r["failed"])
        shown = [m for m in (*METRICS, LEAK) if any(r["metrics"].get(m) is not None for r in rows)]
        for found in rows:
            found["published"] = published_line(found)
            found["numbers"] = [report_page.percent(found["metrics"].get(m)) if m in ("subject", LEAK) else
                                report_page.number(found["metrics"].get(m), 3) for m in shown]  # fmt: skip
        failed = sum(r["failed"] for r in rows)
        context = {
            "title": title,
            "headline": f"{len(rows)} subjects: {len(rows) - failed} completed, {failed} failed",
            "rows": rows,
            "metric_headers": [METRICS.get(m, m) for m in shown],
        }
        (folder / PAGE).write_text(report_page.render(context, TEMPLATE, SECTIONS), encoding="utf-8")
        record = {"title": title, "subjects": rows, "failed": failed}
        (folder / FACTS).write_text(json.dumps(record, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    return {**record, "html": target / PAGE}
