"""The sweep comparison: one page over a sweep's cells (the settings that differ, training time, final loss and
metrics; per prompt the cells' samples side by side; the loss curves overlaid), from the report's templates.

It reads what each cell's report and train entries already hold: no model loads and no stage reruns here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.atomic import atomic_folder, link_or_copy
from tasks.core.sweeps import flatten
from tasks.stages import report_page
from tasks.stages.report import read_losses, report_facts

TEMPLATE = "comparison.html.j2"
SECTIONS = ("cells", "reference", "loss", "samples")
REFERENCE_METRICS = ("dino", "clip_i", "clip_t")  # the DreamBooth paper's table
PAGE = "comparison.html"
FACTS = "comparison.json"
SAMPLES_SHOWN = 4  # seeds per cell and prompt; each cell's own report shows them all
LIST_SHOWN = 3  # list settings (prompts, seeds) longer than this fold in the cells table
METRICS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "subject": "subject"}
LEAK = "leak"  # the toy analyser's subject rate on prompts without the identifier


@dataclass(frozen=True)
class CellRun:
    """A cell as its run left it: its name, resolved config, final Prefect state, and the summary it wrote."""

    name: str
    settings: dict[str, Any]
    state: str
    summary: dict[str, Any] | None


def differing(base: dict[str, Any], cells: list[CellRun]) -> list[str]:
    """Settings (section.key) that differ between cells or from the base config; the run section never counts."""
    flat = [_settings(cell.settings) for cell in cells]
    base_settings = _settings(base)
    names = dict.fromkeys(name for settings in flat for name in settings)
    return [n for n in names if len({repr(s.get(n)) for s in flat} | {repr(base_settings.get(n))}) > 1]


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in flatten(config).items() if not name.startswith("run.")}


def _outputs(cell: CellRun, name: str) -> Path | None:
    value = (cell.summary or {}).get("outputs", {}).get(name)
    return Path(value).parent if value else None


def scores(facts: dict[str, Any] | None) -> dict[str, float | None]:
    """The fine-tuned model's scores, and the toy analyser's leak into prompts without the identifier."""
    if facts is None:
        return {}
    rows = [row for row in facts["metrics"]["rows"] if row["kind"] == "finetuned"]
    found = {name: rows[0].get(name) if rows else None for name in METRICS}
    plain = [row for row in facts["metrics"].get("analyser", []) if row["kind"] == "finetuned" and not row["token"]]
    if plain:
        found[LEAK] = sum(row["subject"] * row["images"] for row in plain) / sum(row["images"] for row in plain)
    return found


def _status(cell: CellRun) -> str:
    error = (cell.summary or {}).get("error")
    if not error:
        return cell.state
    where = ", ".join(str(error[k]) for k in ("stage", "item") if error.get(k))
    return f"{cell.state} ({where}): {error['message']}"


def _samples(cells: list[CellRun], facts: list[dict[str, Any] | None], folder: Path) -> list[dict[str, Any]]:
    """Per prompt, a row of the first seeds per cell (fine-tuned), then one row per base model the cells compared
    with; images are linked into assets/ so the page stands alone."""
    prompts: dict[str, list[dict[str, Any]]] = {}
    bases_shown: set[tuple[str, str]] = set()
    for index, (cell, found) in enumerate(zip(cells, facts, strict=True)):
        if found is None:
            continue
        base_model = str(found["summary"].get("base model", ""))
        for kind, label in (("finetuned", cell.name), ("base", f"base model {base_model}")):
            mine = [s for s in found["samples"] if s["kind"] == kind]
            for prompt in dict.fromkeys(s["prompt"] for s in mine):
                if kind == "base" and (prompt, base_model) in bases_shown:
                    continue
                bases_shown.add((prompt, base_model) if kind == "base" else ("", ""))
                shown = [s for s in mine if s["prompt"] == prompt][:SAMPLES_SHOWN]
                images = [_linked(sample, folder, f"assets/{index}") for sample in shown]
                prompts.setdefault(prompt, []).append({"label": label, "base": kind == "base", "images": images})
    return [{"prompt": p, "rows": sorted(rows, key=lambda row: row["base"])} for p, rows in prompts.items()]


def _linked(sample: dict[str, Any], folder: Path, assets: str) -> dict[str, Any]:
    source = Path(sample["image"])
    asset = f"{assets}/{source.name}"
    if not (folder / asset).exists():
        (folder / assets).mkdir(parents=True, exist_ok=True)
        link_or_copy(source, folder / asset)
    return {"src": asset, "alt": sample["prompt"], "caption": f"seed {sample['seed']}"}


def plot_losses(curves: dict[str, pd.DataFrame], out: Path) -> None:
    """Each cell's loss, as a moving average (single steps are noisy), on one set of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, losses in curves.items():
        window = max(1, len(losses) // 20)
        axes.plot(losses["step"], losses["loss"].rolling(window, min_periods=1).mean(), linewidth=1.6, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss (moving average of {max(1, max(len(c) for c in curves.values()) // 20)} steps)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(out, format="png", metadata={"Software": None})


def _number(value: Any, digits: int) -> str:
    return report_page.number(value, digits) if value is not None else "—"


def reference_rows(facts: list[dict[str, Any] | None], reference: dict[str, dict[str, float]]) -> list[dict]:
    """The cells' mean scores (fine-tuned samples, and the instance images against each other) beside published
    figures, as the DreamBooth paper's table has them."""
    scored = [found for found in facts if found is not None]
    rows = []
    for kind, label in (("finetuned", "fine-tuned"), ("instance", "real images")):
        groups = [row for found in scored for row in found["metrics"]["rows"] if row["kind"] == kind]
        means = {}
        for metric in REFERENCE_METRICS:
            values = [row[metric] for row in groups if row.get(metric) is not None]
            means[metric] = sum(values) / len(values) if values else None
        rows.append({"name": f"this sweep: {label} (mean of {len(scored)} cells)", **means})
    return rows + [{"name": name, **{m: figures.get(m) for m in REFERENCE_METRICS}} for name, figures in
                   reference.items()]  # fmt: skip


def write(
    name: str, base: dict[str, Any], cells: list[CellRun], target: Path, reference: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Write `target/comparison.html` (+ assets/ and comparison.json), replacing an earlier comparison whole; return
    the facts the Prefect artifacts show. `reference`: published figures to show beside the cells' means."""
    columns = differing(base, cells)
    base_settings = _settings(base)
    with atomic_folder(target, replace=True) as folder:
        facts = [report_facts(path) if (path := _outputs(cell, "report_html")) else None for cell in cells]
        trains = [_outputs(cell, "loss_csv") for cell in cells]
        curves = {cell.name: read_losses(train) for cell, train in zip(cells, trains, strict=True) if train}
        curves = {cell: losses for cell, losses in curves.items() if len(losses)}
        rows = []
        for cell, found in zip(cells, facts, strict=True):
            losses = curves.get(cell.name)
            settings = _settings(cell.settings)
            rows.append(
                {
                    "cell": cell.name,
                    "status": _status(cell),
                    "failed": cell.state != "Completed" or bool((cell.summary or {}).get("error")),
                    "worker": (cell.summary or {}).get("run", {}).get("worker") or "",
                    "settings": {c: settings.get(c) for c in columns},
                    "differs": [c for c in columns if repr(settings.get(c)) != repr(base_settings.get(c))],
                    "training_seconds": float(losses["seconds"].iloc[-1]) if losses is not None else None,
                    "final_loss": float(losses["loss"].iloc[-1]) if losses is not None else None,
                    "metrics": scores(found),
                    "report": relative_link(found["html"], target) if found else None,
                }
            )
        shown = [m for m in (*METRICS, LEAK) if any(row["metrics"].get(m) is not None for row in rows)]
        means = reference_rows(facts, reference) if reference else []
        loss_plot = None
        if curves:
            (folder / "assets").mkdir(exist_ok=True)
            plot_losses(curves, folder / "assets" / "loss.png")
            loss_plot = "assets/loss.png"
        page = report_page.render(
            {
                "title": f"sweep {name}: {len(cells)} cells",
                "columns": columns,
                "metric_headers": [METRICS.get(m, m) for m in shown],
                "rows": [_page_row(row, columns, shown) for row in rows],
                "loss_plot": loss_plot,
                "samples": _samples(cells, facts, folder),
                "reference": [[row["name"], *(_number(row[m], 3) for m in REFERENCE_METRICS)] for row in means],
                "reference_headers": ["", *(METRICS[m] for m in REFERENCE_METRICS)],
            },
            TEMPLATE,
            SECTIONS,
        )
        (folder / PAGE).write_text(page, encoding="utf-8")
        record = {"name": name, "columns": columns, "cells": rows, "reference": means}
        (folder / FACTS).write_text(json.dumps(record, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    return {**record, "html": target / PAGE}


def relative_link(path: Path, target: Path) -> str:
    """A run's report as a link from a page in `target`: both live under the artifact root."""
    return Path(os.path.relpath(path, target)).as_posix()


def _setting(value: Any, differs: bool) -> dict[str, Any]:
    """A setting's cell: a list longer than a few items folds behind its length, so one row stays one line high."""
    folded = f"{len(value)} items" if isinstance(value, list) and len(value) > LIST_SHOWN else None
    return {"text": report_page.plain(value), "folded": folded, "differs": differs}


def _page_row(row: dict[str, Any], columns: list[str], shown: list[str]) -> dict[str, Any]:
    settings = [_setting(row["settings"][c], c in row["differs"]) for c in columns]
    numbers = [_number(row["training_seconds"], 1), _number(row["final_loss"], 4)]
    numbers += [report_page.percent(row["metrics"].get(m)) if m in ("subject", LEAK) else
                _number(row["metrics"].get(m), 3) for m in shown]  # fmt: skip
    return {**row, "settings": settings, "numbers": numbers}
