"""A night of many subjects as one parent flow run: the subjects folder is listed when the run starts, each subject
becomes a `dreambooth` run under it (here in turn, or on a work pool's workers, one subject per GPU), and the night
ends with its morning summary: one page and one Prefect artifact.

Subjects share the artifact root, so an unchanged subject is served from the store end to end and what changed in
one subject's photos retrains that subject alone. A subject the store holds whole is served here, in the parent run:
it needs no GPU, so it never waits for a worker (nor starts a process on one).
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from real annotations.
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.dreambooth import check_plan, planned_keys
from flows.preflight import check_settings
from flows.publish import report_link
from flows.records import RunKeys
from flows.runner import parent_record
from flows.sweep import CellProgress, Ran, run_here, submit, summary_of, wait_all
from tasks.core.config import ConfigError, RunConfig
from tasks.core.remote import open_store
from tasks.core.stage import StageError
from tasks.core.store import Store
from tasks.core.subjects import Subject, list_subjects
from tasks.core.sweeps import Cell
from tasks.core.values import folder_or_url
from tasks.stages import night, promotion
from tasks.stages.night import SubjectRun

NIGHTS_FOLDER = "nights"  # <artifacts root>/nights/<date>_<run>/night.html


def _settings_problem(subject: Subject) -> str | None:
    """What keeps a subject from being submitted, checked here: its settings and folders, not its devices."""
    if subject.problem or subject.config is None:
        return subject.problem
    try:
        check_settings(subject.config)
    except ConfigError as err:
        return str(err)
    return None


def served_here(config: RunConfig) -> bool:
    """Whether the store holds every stage of a subject and this machine's checks pass for it: such a subject needs
    no GPU, so it is served here, in the parent run, and never waits for a worker."""
    try:
        check_plan(config)
        stages = planned_keys(config)
    except (StageError, ConfigError):
        return False
    return all(stage["status"] in ("cached", "skipped") for stage in stages.values())


def _run(ready: list[Subject], store: Store, pool: str, slots: int | None, retries: int) -> list[Ran]:
    """Each ready subject's run, here in turn or, unless the store holds all of it, on `pool`; a run that crashed or
    failed unexpectedly is tried again, up to `retries` times."""
    cells = [Cell(name=subject.name, values={}, config=subject.config) for subject in ready]
    progress = CellProgress(len(cells), "subjects", "subjects-progress")
    if not pool:
        return run_here(cells, progress, store, retries)
    here = [cell for cell in cells if served_here(cell.config)]
    remote = [cell for cell in cells if cell not in here]
    submitted = submit(remote, pool, slots, "subjects") if remote else []
    ran = dict(zip((cell.name for cell in here), run_here(here, progress, store, retries), strict=True))
    ran |= dict(zip((cell.name for cell in remote), wait_all(submitted, progress, store, retries), strict=True))
    return [ran[cell.name] for cell in cells]


@flow(name="dreambooth-subjects")
def subjects(
    folder: str, config: str = "", settings: list[str] | None = None, artifacts: str = "", pool: str = "",
    slots: int | None = None, retries: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Train every subfolder of `folder` as a subject (its optional subject.toml on top of `config` and `settings`),
    here or on work pool `pool`, trying a crashed subject again up to `retries` times, then write the night's
    summary; fails naming the subjects that failed."""
    try:
        base, found = list_subjects(folder_or_url(folder), Path(config) if config else None, settings or [],
                                    Path(artifacts) if artifacts else None)  # fmt: skip
    except ConfigError as err:
        raise StageError("subjects", str(err)) from None
    store = open_store(base.run)
    with RunKeys(store.root, str(flow_run.id)):  # its lock: `runs` marks the night Crashed once its process is gone
        return _night(folder, found, store, pool, slots, retries)


def _night(folder: str, found: list[Subject], store: Store, pool: str, slots: int | None, retries: int) -> dict:
    root = store.root
    if not found:  # a served night whose folder has not filled yet: an empty summary, not a failure
        get_run_logger().warning(f"no subjects in {folder!r} tonight: add one subfolder of images per subject")
    problems = {subject.name: _settings_problem(subject) for subject in found}
    ready = [subject for subject in found if problems[subject.name] is None]
    get_run_logger().info(f"{len(found)} subjects in {folder}: {len(ready)} to run, {len(found) - len(ready)} "
                          "that cannot start")  # fmt: skip
    ran = dict(zip((s.name for s in ready), _run(ready, store, pool, slots, retries), strict=True))
    started = flow_run.scheduled_start_time or datetime.now()
    title = f"night of {started:%Y-%m-%d %H:%M}: {Path(folder).name}"
    runs = [_subject_run(s, ran[s.name], store, title) if s.name in ran else
            SubjectRun(s.name, "Failed", None, problems[s.name]) for s in found]  # fmt: skip
    target = root / NIGHTS_FOLDER / f"{started:%Y-%m-%d_%H%M%S}_{flow_run.name}"
    facts = night.write(title, runs, target)
    publish(facts, root)
    record = {"folder": folder, "summary": str(facts["html"]), "subjects": facts["subjects"],
              "flow_runs": {name: run.flow_run_id for name, run in ran.items()}}  # fmt: skip
    parent_record(root, str(flow_run.id), "night").write_text(json.dumps(record, indent=1, default=str))
    failed = [r for r in facts["subjects"] if r["failed"]]
    if failed:
        causes = "; ".join(f"{r['subject']} ({r['cause']})" for r in failed)
        raise StageError("subjects", f"{len(failed)} of {len(runs)} subjects failed: {causes}")
    return record


def _subject_run(subject: Subject, ran: Ran, store: Store, title: str) -> SubjectRun:
    """A subject as its run left it; a completed one's model goes through the promotion gate, and is published when
    it passes (a Prefect link artifact to its published folder)."""
    root, summary, gate = store.root, summary_of(store, ran.flow_run_id), subject.config.publish
    promoted = None
    if ran.state == "Completed" and summary is not None:
        promoted = promotion.promote(root, subject.name, summary, gate.metric, gate.tolerance, title)
    if promoted is not None:
        get_run_logger().info(f"{subject.name}: {'published' if promoted.published else 'kept'} ({promoted.why})")
    if promoted is not None and promoted.published:
        link = report_link(promotion.folder(root, subject.name), root)
        create_link_artifact(link, link_text=f"{subject.name}: published model", description=promoted.why,
                             key=f"published-{re.sub(r'[^a-z0-9-]', '-', subject.name.lower())}")  # fmt: skip
    return SubjectRun(subject.name, ran.state, summary, tries=ran.tries, promotion=promoted)


def publish(facts: dict[str, Any], root: Path) -> None:
    """The morning summary in the Prefect UI: one markdown table (failed subjects first) and a link to the page."""
    link = report_link(Path(facts["html"]), root)
    headers = ["subject", "state", "stages", "training (s)", "worker", "GPU", "published", "report"]
    lines = [
        f"# boothflow {facts['title']}",
        "",
        f"{len(facts['subjects'])} subjects, {facts['failed']} failed; summary: [{facts['html']}]({link})",
        "",
        f"| {' | '.join(headers)} |",
        "|---" * len(headers) + "|",
    ]
    for row in facts["subjects"]:
        stages = ", ".join(f"{s['stage']} {s['text']}" for s in row["stages"]) or "—"
        state = night.state_line(row)
        seconds = f"{row['training_seconds']:.1f}" if row["training_seconds"] is not None else "—"
        report = f"[report]({report_link(Path(facts['html']).parent / row['report'], root)})" if row["report"] else "—"
        cells = [row["subject"], state, stages, seconds, row["worker"] or "here", row["gpu"] or "—", row["published"],
                 report]  # fmt: skip
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    create_markdown_artifact("\n".join(lines), key="night-summary", description="boothflow morning summary")
    create_link_artifact(link, link_text=f"morning summary: {facts['html']}", key="night-page",
                         description="The night's summary page")  # fmt: skip
