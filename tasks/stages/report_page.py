"""The report page: the context its template shows, built from the facts the report stage gathered, and the page
rendered from `templates/report.html.j2` and `templates/report.css` (autoescaped: user text is never markup).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from tasks.core.config import RunConfig
from tasks.core.tables import KIND_LABELS

SECTIONS = ("summary", "settings", "stages", "inputs", "loss", "samples", "checkpoints", "metrics")
"""The id of every section element of report.html, in page order; links and tests rely on them."""
TEMPLATE, MACROS, CSS = "report.html.j2", "macros.html.j2", "report.css"


@dataclass(frozen=True)
class Shown:
    """A generated image as the page shows it: its prompt, kind, step and seed, and its asset path."""

    kind: str
    step: int | None
    template: str
    prompt: str
    seed: int
    asset: str


def _templates() -> Any:
    return resources.files("tasks.stages") / "templates"


def template_digest() -> str:
    """The template and stylesheet as the report's key sees them: editing either reruns the report alone."""
    h = hashlib.sha256()
    for name in (TEMPLATE, MACROS, CSS):
        h.update((_templates() / name).read_bytes())
    return h.hexdigest()


def render(context: dict[str, Any], template: str = TEMPLATE, sections: tuple[str, ...] = SECTIONS) -> str:
    """A page from one of the templates (the run report by default), with the shared stylesheet inlined."""
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (_templates() / name).read_text(encoding="utf-8")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    css = Markup((_templates() / CSS).read_text(encoding="utf-8"))  # our stylesheet, not user text
    return environment.get_template(template).render(**context, css=css, sections=sections)


def number(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def compact(values: Iterable[int]) -> str:
    """Integers as runs: 0, 1, 2, 3, 7, 9, 10 -> `0-3, 7, 9-10`."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def plain(value: Any) -> str:
    """A settings value as a person reads it: integers as runs, other lists one item per line, empty values named."""
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return compact(value)
        return "\n".join(plain(v) for v in value) if value else "(none)"
    return "(empty)" if value is None or value == "" else str(value)


def _meaning(section: str, name: str) -> str:
    """The setting's one-line description from the config models."""
    outer = RunConfig.model_fields.get(section)
    inner = getattr(getattr(outer, "annotation", None), "model_fields", {}).get(name)
    return (inner.description or "") if inner is not None else ""


def settings(resolved: dict[str, Any]) -> list[dict[str, Any]]:
    """The resolved config as one small table per TOML section; a name's tooltip is its description."""
    groups = []
    for section, values in resolved.items():
        fields = values if isinstance(values, dict) else {section: values}
        rows = [{"name": n, "meaning": _meaning(section, n), "value": plain(v)} for n, v in fields.items()]
        groups.append({"section": section, "rows": rows})
    return groups


def stages(recorded: dict[str, Any]) -> list[tuple[Any, ...]]:
    def count(value: Any) -> Any:
        return "—" if value is None else value

    return [
        (
            name,
            info.get("status", "—"),
            info.get("key") or "—",
            number(info.get("seconds"), 2),
            count(info.get("items_processed")),
            count(info.get("items_cached")),
            count(info.get("items_rejected")),
            number(info.get("peak_memory_mb"), 0),
        )
        for name, info in recorded.items()
    ]


def _image(sample: Shown, caption: str) -> dict[str, Any]:
    return {"src": sample.asset, "alt": sample.prompt, "caption": caption}


def samples(shown: list[Shown], per_row: int) -> list[dict[str, Any]]:
    """Per prompt, a row of seeds per model (fine-tuned, then base): the first `per_row` seeds shown, the rest
    behind a disclosure, so 64 seeds never run off the page."""
    final = [s for s in shown if s.kind in ("finetuned", "base")]
    prompts = []
    for template in dict.fromkeys(s.template for s in final):
        mine = [s for s in final if s.template == template]
        models = []
        for kind in ("finetuned", "base"):
            members = [s for s in mine if s.kind == kind]
            if not members:
                continue
            label = KIND_LABELS[kind]
            images = [_image(s, f"{label}, seed {s.seed}") for s in members]
            models.append(
                {
                    "label": label,
                    "seeds": compact(s.seed for s in members),
                    "shown": images[:per_row],
                    "more": images[per_row:],
                    "more_seeds": compact(s.seed for s in members[per_row:]),
                }
            )
        prompts.append({"prompt": mine[0].prompt, "models": models})
    return prompts


def checkpoints(shown: list[Shown], steps: Any) -> dict[str, Any] | None:
    """Validation prompts (first seed) rendered from the weights of each sample step, then from the final ones."""
    found = [s for s in shown if s.kind == "checkpoint"]
    if not found:
        return None
    templates = list(dict.fromkeys(s.template for s in found))
    at: dict[tuple[int | None, str], Shown] = {}
    for sample in found:  # the first validation seed of each step and prompt; the metrics score them all
        at.setdefault((sample.step, sample.template), sample)
    seeds = {template: sample.seed for (_, template), sample in reversed(at.items())}
    final = {s.template: s for s in shown if s.kind == "finetuned" and seeds.get(s.template) == s.seed}

    def row(label: str, cells: list[Shown | None]) -> dict[str, Any]:
        return {"label": label, "images": [_image(s, f"seed {s.seed}") if s else None for s in cells]}

    rows = [row(f"step {step}", [at.get((step, t)) for t in templates]) for step in sorted({s.step for s in found})]
    if final:
        rows.append(row(f"final (step {steps})", [final.get(t) for t in templates]))
    prompts = [next(s.prompt for s in found if s.template == t) for t in templates]
    return {"prompts": prompts, "rows": rows}


def metrics(scores: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage's tables as the page shows them."""
    analysed = bool(scores.get("analyser"))
    rows = [
        (row["group"], row["images"], number(row["clip_t"]), number(row["clip_i"]), number(row["dino"]))
        + ((percent(row.get("subject")),) if analysed else ())
        for row in scores["rows"]
    ]
    analyser = [
        (r["group"], r["prompt"], r["images"], percent(r["subject"]), percent(r["words"]))
        for r in scores.get("analyser", [])
    ]
    used = ", ".join(f"{name.upper()}: {model_id}" for name, model_id in scores["models"].items() if model_id)
    headers = ["samples", "images", "CLIP-T", "CLIP-I", "DINO", *(["subject (analyser)"] if analysed else [])]
    return {"headers": headers, "rows": rows, "analyser": analyser, "missing": scores["missing"], "models": used}
