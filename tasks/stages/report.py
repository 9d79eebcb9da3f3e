"""Report stage: one self-contained HTML page per run (summary, settings, stages, inputs, loss, samples, metrics).

A person opens `report.html` from its folder with no server and no network; Prefect artifacts reuse its facts.
The page comes from a template (`report_page`), the scores from the evaluate stage: a page change scores nothing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from tasks.core.atomic import link_or_copy
from tasks.core.config import ReportSection, RunConfig, fill_prompt
from tasks.core.manifest import file_sha256
from tasks.core.stage import Stage, StageResult
from tasks.core.store import Store, stage_key
from tasks.core.tables import KIND_LABELS, METRICS_FILE, Sample, read_json, read_rows, read_samples
from tasks.sd import imaging
from tasks.sd.layout import SELECTION_FILE
from tasks.stages import report_page
from tasks.stages.report_page import Shown

STAGE = "report"
CODE_VERSION = 3  # 3: metrics come from the evaluate stage, the page from a template (whose contents are keyed)
THUMBNAIL_SIDE = 256
PREVIEW_MAX_PIXELS = 1 << 40  # preprocess already accepted the file; Pillow's own bomb guard still applies
CLASS_IMAGES_SHOWN = 8


@dataclass(frozen=True)
class ReportInputs:
    """The run's upstream results plus what only the page shows (run name, resolved settings, stage table)."""

    run_name: str
    settings: dict[str, Any]
    stages: dict[str, Any]
    instance_dir: Path
    preprocess: StageResult
    class_images: StageResult | None
    train: StageResult
    generate: StageResult
    evaluate: StageResult
    token: str
    class_name: str
    selection: StageResult | None = None  # the select stage, when train.pick chose the weights by a metric
    waiting: tuple[str, ...] = ()  # instance files left for the next run: modified too recently

    @classmethod
    def of(cls, config: RunConfig, stages: dict[str, Any], *results: StageResult | None,
           selection: StageResult | None = None, waiting: tuple[str, ...] = ()) -> ReportInputs:  # fmt: skip
        """`results`: preprocess, class images (None without prior preservation), train, generate and evaluate."""
        data = config.data
        return cls(config.run.name, config.model_dump(mode="json"), copy.deepcopy(stages), data.instance_dir,
                   *results, data.token, data.class_name, selection, waiting)  # fmt: skip


def stage_key_for(cfg: ReportSection, inputs: ReportInputs) -> str:
    """Upstream keys, the page's template and stylesheet, and the run name; never timings, settings or paths."""
    return stage_key(
        STAGE,
        CODE_VERSION,
        cfg.keyed(),
        page=report_page.template_digest(),
        preprocess=inputs.preprocess.key,
        class_images=inputs.class_images.key if inputs.class_images else None,
        train=inputs.train.key,
        generate=inputs.generate.key,
        evaluate=inputs.evaluate.key,
        run_name=inputs.run_name,
        **({"selection": inputs.selection.key} if inputs.selection else {}),
        **({"waiting": list(inputs.waiting)} if inputs.waiting else {}),
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _size_text(raw: str) -> str:
    try:
        width, height = json.loads(raw)
    except (ValueError, TypeError):
        return raw
    return f"{width}×{height}"


def read_losses(train: Path) -> pd.DataFrame:
    path = train / "metrics.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({"step": [], "loss": []})
    return pd.read_csv(path)


def plot_loss(losses: pd.DataFrame, out: Path) -> None:
    """Loss per step with a moving average (single steps are noisy: each draws its own timestep)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(losses["step"], losses["loss"], color="#9db4d3", linewidth=1, label="loss")
    window = max(1, len(losses) // 20)
    smooth = losses["loss"].rolling(window, min_periods=1).mean()
    axes.plot(losses["step"], smooth, color="#1f4e8c", linewidth=2, label=f"mean of {window} steps")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out, format="png", metadata={"Software": None})


def thumbnail(source: Path, out: Path) -> None:
    """The source file as the user sees it (EXIF-upright, RGB), small enough for the page."""
    image = imaging.to_rgb(imaging.load_upright(source, min_side=1, max_pixels=PREVIEW_MAX_PIXELS))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    image.save(out, format="JPEG", quality=88)


# ---- the stage ----


def _link_samples(samples: list[Sample], folder: Path) -> list[Shown]:
    """Every sample linked under assets/samples/ (a hard link: no copy), as the page shows it."""
    shown = []
    for sample in samples:
        asset = f"assets/samples/{_safe_name(sample.id)}.png"
        if not (folder / asset).exists():
            link_or_copy(sample.source, folder / asset)
        shown.append(Shown(sample.kind, sample.step, sample.template, sample.prompt, sample.seed, asset))
    return shown


def _add_input(row: dict[str, str], instance_dir: Path, preprocessed: Path, folder: Path) -> dict[str, Any]:
    """Link the training crop into assets/inputs/ and make an upright thumbnail of its unchanged source file."""
    name = _safe_name(row["source_sha256"][:16])
    after = f"assets/inputs/{name}.png"
    link_or_copy(preprocessed / row["image"], folder / after)
    source = instance_dir / row["source"]
    before, note = None, ""
    if not source.is_file():
        note = "source file not found"
    elif file_sha256(source) != row["source_sha256"]:
        note = "source file changed since preprocessing"
    else:
        try:
            thumbnail(source, folder / f"assets/inputs/{name}-source.jpg")
            before = f"assets/inputs/{name}-source.jpg"
        except imaging.Rejected as err:
            note = f"no preview: {err}"
    size, crop = _size_text(row["original_size"]), row["crop_mode"]
    return {"source": row["source"], "before": before, "before_note": note, "after": after, "size": size, "crop": crop}


def _class_images(classes: StageResult | None, folder: Path) -> dict[str, Any] | None:
    """The first class images, linked into assets/class/, when prior preservation made them; and how many there are."""
    if classes is None:
        return None
    rows = [r for r in read_rows(classes.path / "items.csv", "class_images", STAGE) if r["status"] == "ok"]
    shown = []
    for row in rows[:CLASS_IMAGES_SHOWN]:
        asset = f"assets/class/{_safe_name(row['id'])}.png"
        link_or_copy(classes.path / row["image"], folder / asset)
        shown.append({"src": asset, "alt": row["prompt"], "caption": f"class image {row['index']}"})
    return {"count": len(rows), "prompt": rows[0]["prompt"] if rows else "", "shown": shown}


def summary_facts(
    inputs: ReportInputs,
    training: dict[str, Any],
    losses: pd.DataFrame,
    instance_counts: tuple[int, int],
    class_count: int,
    samples: list[Shown],
) -> dict[str, Any]:
    """The facts a reader wants first, keyed by their label on the page."""
    kinds = [s.kind for s in samples]
    template = inputs.settings.get("data", {}).get("instance_prompt", "")
    captions = training.get("captions")
    return {
        "run name": inputs.run_name,
        "base model": inputs.settings.get("model", {}).get("id", "—"),
        "instance prompt": fill_prompt(template, inputs.token, inputs.class_name),
        **({"captions": _captions_text(captions)} if captions else {}),
        **({"picked weights": _picked_text(inputs.selection)} if inputs.selection else {}),
        "token / class": f"{inputs.token} / {inputs.class_name}",
        "training": f"{training.get('method', '—')} fine-tune ({training.get('family', '—')})",
        "steps": training.get("steps"),
        "global batch": _global_batch(training),
        "final loss": float(losses["loss"].iloc[-1]) if len(losses) else None,
        "instance images": f"{instance_counts[0]} used, {instance_counts[1]} rejected",
        "class images": class_count if inputs.class_images else "none (prior preservation off)",
        "samples": ", ".join(f"{kinds.count(k)} {KIND_LABELS.get(k, k)}" for k in dict.fromkeys(kinds)) or "none",
    }


def _picked_text(selection: StageResult) -> str:
    """Which step won, by which metric and by how much against the last step; every candidate's score."""
    picked = read_json(selection.path / SELECTION_FILE, "select", STAGE)
    every = ", ".join(f"{step}: {value:.3f}" for step, value in picked["candidates"].items())
    return (f"step {picked['step']} of {picked['last_step']} by {picked['metric']}: {picked['value']:.3f} against "
            f"{picked['last_value']:.3f} at the last step (every candidate: {every})")  # fmt: skip


def _captions_text(captions: dict[str, int]) -> str:
    """How many images trained on their own caption, and how many fell back to the instance prompt."""
    return (f"{captions['sidecar']} images with their .txt caption, "
            f"{captions['instance prompt']} with the instance prompt (no caption file)")  # fmt: skip


def _global_batch(training: dict[str, Any]) -> str:
    """Images per optimizer step, and how they were split (processes share the batch; see train.num_processes)."""
    if "global_batch" not in training:
        return "—"
    parts = (f"{training['batch_size']} per process x {training['grad_accum']} accumulation"
             f" x {training['num_processes']} process{'es' if training['num_processes'] > 1 else ''}")  # fmt: skip
    return f"{training['global_batch']} ({parts})"


def _writer(cfg: ReportSection, inputs: ReportInputs, key: str) -> Callable[[Path], dict[str, Any]]:
    """The entry's writer: assets (linked images, thumbnails, loss plot), then report.html and report.json."""

    def build(folder: Path) -> dict[str, Any]:
        for sub in ("inputs", "samples", "class"):
            (folder / "assets" / sub).mkdir(parents=True)
        training = read_json(inputs.train.path / "training.json", "train", STAGE)
        scores = read_json(inputs.evaluate.path / METRICS_FILE, "evaluate", STAGE)
        losses = read_losses(inputs.train.path)
        items = read_rows(inputs.preprocess.path / "items.csv", "preprocess", STAGE)
        usable = [r for r in items if r["status"] == "ok"]
        rejected = [(r["source"], r["reason"]) for r in items if r["status"] != "ok"]
        samples = _link_samples(read_samples(inputs.generate.path, STAGE), folder)
        shown = [_add_input(row, inputs.instance_dir, inputs.preprocess.path, folder) for row in usable]
        classes = _class_images(inputs.class_images, folder)
        loss = None
        if len(losses):
            loss = {"plot": "assets/loss.png", "text": _loss_text(losses, training.get("steps"))}
            plot_loss(losses, folder / loss["plot"])
        class_count = classes["count"] if classes else 0
        summary = summary_facts(inputs, training, losses, (len(usable), len(rejected)), class_count, samples)
        page = report_page.render(
            {
                "title": f"{inputs.run_name}: {summary['instance prompt']}",
                "key": key,
                "summary": list({**summary, "final loss": report_page.number(summary["final loss"], 4)}.items()),
                "settings": report_page.settings(inputs.settings),
                "stages": report_page.stages(inputs.stages),
                "inputs": {
                    "shown": shown,
                    "rejected": rejected,
                    "classes": classes,
                    "waiting": inputs.waiting,
                    "settle_minutes": inputs.settings["data"]["settle_minutes"],
                },
                "loss": loss,
                "samples": report_page.samples(samples, cfg.seeds_shown),
                "checkpoints": report_page.checkpoints(samples, training.get("steps")),
                "picked": summary.get("picked weights"),
                "metrics": report_page.metrics(scores),
            }
        )
        (folder / "report.html").write_text(page, encoding="utf-8")
        listed = [
            {"kind": s.kind, "step": s.step, "prompt": s.prompt, "seed": s.seed, "image": s.asset} for s in samples
        ]
        facts = {"key": key, "html": "report.html", "summary": summary, "metrics": scores, "samples": listed}
        (folder / "report.json").write_text(json.dumps(facts, indent=1, ensure_ascii=False), encoding="utf-8")
        images = sum(1 for f in (folder / "assets").rglob("*") if f.is_file())
        return {"items": images}

    return build


def _loss_text(losses: pd.DataFrame, steps: Any) -> str:
    final, lowest = float(losses["loss"].iloc[-1]), float(losses["loss"].min())
    return f"{len(losses)} logged steps of {steps}; final loss {final:.4f}, lowest {lowest:.4f}."


def build(cfg: ReportSection, inputs: ReportInputs, store: Store, key: str) -> StageResult:
    """Write the report folder; no model loads here."""
    entry = store.get_or_create(STAGE, key, _writer(cfg, inputs, key), cfg.keyed())
    if not entry.created:  # another run wrote it while this one waited for the lock
        return StageResult.cached(entry)
    return StageResult(STAGE, key, entry.path, items_processed=entry.info["items"])


def report_facts(entry: Path) -> dict[str, Any]:
    """What the Prefect artifacts show, read back from the report folder: page, summary, metrics, samples."""
    facts = json.loads((Path(entry) / "report.json").read_text(encoding="utf-8"))
    samples = [{**sample, "image": Path(entry) / sample["image"]} for sample in facts["samples"]]
    return {
        "html": Path(entry) / facts["html"],
        "summary": facts["summary"],
        "metrics": facts["metrics"],
        "samples": samples,
    }


stage = Stage(STAGE, "report", stage_key_for, build, outputs={"report_html": "report.html"})
run = stage.run  # the plain function: cached entry or build
