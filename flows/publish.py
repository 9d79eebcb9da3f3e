"""Prefect UI artifacts of a run: the summary as markdown, the stage table, samples with metrics, a report link.

Built by the flow itself after its stages, on every run (failed and fully cached ones included): a cached task
does not run its body, so artifacts made inside stage tasks would vanish on reruns. Keys are stable, so the UI
shows each artifact's history across nights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.stages.report import report_facts

ARTIFACTS_URL_ENV = "BOOTHFLOW_ARTIFACTS_URL"
UI_FILE = ".boothflow-ui.json"
METRICS = ("clip_t", "clip_i", "dino", "subject")  # subject: the toy analyser's hit rate
METRIC_COLUMNS = ("group", "kind", "step", "images", *METRICS)
STAGE_COLUMNS = ("status", "key", "seconds", "items_processed", "items_cached", "items_rejected", "peak_memory_mb")


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"stage": name, **{c: entry.get(c) for c in STAGE_COLUMNS}} for name, entry in summary["stages"].items()]


def ui_file(root: Path) -> Path:
    """Where `boothflow ui` records the URL it serves the artifact root at, for report links of runs."""
    return Path(root) / UI_FILE


def report_link(html: Path, root: Path) -> str:
    """An http URL where `boothflow ui` serves the artifact root (browsers refuse file:// links from a web page),
    else a file:// URI whose text names the path."""
    base = os.environ.get(ARTIFACTS_URL_ENV)
    if not base and ui_file(root).is_file():
        base = json.loads(ui_file(root).read_text())["artifacts_url"]
    if base and html.is_relative_to(root):
        return f"{base.rstrip('/')}/{html.relative_to(root).as_posix()}"
    return html.as_uri()


def _cell(value: Any) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict[str, Any], facts: dict[str, Any] | None, link: str | None) -> str:
    run, error = summary["run"], summary["error"]
    lines = [f"# boothflow run `{_cell(run['name'])}`", ""]
    if error:
        where = ", ".join(f"{k} `{_cell(error[k])}`" for k in ("stage", "item") if error.get(k))
        lines += [f"**Failed** ({where}): {_cell(error['message'])}", ""]
    else:
        lines += ["**Completed.**", ""]
    lines += ["| " + " | ".join(("stage", *STAGE_COLUMNS)) + " |", "|" + " --- |" * (len(STAGE_COLUMNS) + 1)]
    lines += ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in stage_rows(summary)]
    loaded = summary.get("models_loaded") or ["none (every model-using stage was cached)"]
    lines += ["", "Models loaded: " + ", ".join(_cell(m) for m in loaded), ""]
    if facts:
        columns = [c for c in METRIC_COLUMNS if c not in METRICS or c in shown_metrics(facts)]
        lines += ["## Metrics", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in metric_rows(facts)]
        lines += [f"- {_cell(missing)}" for missing in facts["metrics"]["missing"]]
        lines += ["", f"Report: [{facts['html']}]({link})", ""]
    return "\n".join(lines)


def shown_metrics(facts: dict[str, Any]) -> list[str]:
    """The metric columns for this report: the analyser's only when it scored the samples."""
    return [m for m in METRICS if m != "subject" or facts["metrics"].get("analyser")]


def metric_rows(facts: dict[str, Any]) -> list[dict[str, Any]]:
    return facts["metrics"]["rows"]


def sample_rows(facts: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sample with the metrics of its group (fine-tuned, base or a checkpoint step)."""
    by_group = {(row["kind"], row["step"]): row for row in metric_rows(facts)}
    rows = []
    for sample in facts["samples"]:
        metrics = by_group.get((sample["kind"], sample["step"]), {})
        rows.append({**sample, "image": str(sample["image"]), **{m: metrics.get(m) for m in shown_metrics(facts)}})
    return rows


def publish(summary: dict[str, Any], root: Path) -> None:
    """Create this run's artifacts; the report ones only when the run got as far as a report."""
    html = summary["outputs"].get("report_html")
    facts = report_facts(Path(html).parent) if html else None
    link = report_link(Path(html), Path(root)) if html else None
    create_markdown_artifact(summary_markdown(summary, facts, link), key="run-summary", description="boothflow run")
    create_table_artifact(stage_rows(summary), key="stage-summary", description="What each stage did in this run")
    if facts:
        create_table_artifact(sample_rows(facts), key="report-samples", description="Generated samples and metrics")
        create_link_artifact(link, link_text=f"report: {html}", key="report-link", description="HTML report")
