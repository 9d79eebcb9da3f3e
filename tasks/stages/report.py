"""Report stage: one self-contained HTML page per run (summary, settings, stages, inputs, loss, samples, metrics).

A person opens `report.html` from its folder with no server and no network; Prefect artifacts reuse its facts.
"""

from __future__ import annotations

import copy
import html
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import torch
from PIL import Image

from tasks.core.batching import batched
from tasks.core.config import ReportSection, RunConfig, fill_prompt
from tasks.core.progress import track
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, file_sha256, link_or_copy, stage_key
from tasks.sd import imaging
from tasks.sd.device import device as accelerator
from tasks.sd.device import loaded
from tasks.sd.models import cached_folder, component_identity

STAGE = "report"
CODE_VERSION = 2  # 2: the summary shows the global batch
SECTIONS = ("summary", "settings", "stages", "inputs", "loss", "samples", "checkpoints", "metrics")
"""The id of every section element of report.html, in page order; links and tests rely on them."""
MODEL_SETTINGS = ("clip_model", "dino_model")  # keyed by the models' identities, never by a folder path
THUMBNAIL_SIDE = 256
PREVIEW_MAX_PIXELS = 1 << 40  # preprocess already accepted the file; Pillow's own bomb guard still applies
CLASS_IMAGES_SHOWN = 8
EMBED_BATCH = 16
KIND_LABELS = {"finetuned": "fine-tuned", "base": "base model", "checkpoint": "checkpoint"}


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
    token: str
    class_name: str

    @classmethod
    def of(cls, config: RunConfig, stages: dict[str, Any], *results: StageResult | None) -> ReportInputs:
        """`results`: preprocess, class images (None without prior preservation), train and generate."""
        data = config.data
        return cls(config.run.name, config.model_dump(mode="json"), copy.deepcopy(stages), data.instance_dir,
                   *results, data.token, data.class_name)  # fmt: skip


@dataclass(frozen=True)
class MetricModel:
    """One of the two scoring models: its setting, what it scores, and a known-good example id."""

    name: str
    setting: str
    scores: str
    example: str


CLIP = MetricModel("clip", "report.clip_model", "CLIP-T and CLIP-I", "openai/clip-vit-large-patch14")
DINO = MetricModel("dino", "report.dino_model", "DINO", "facebook/dino-vits16")


@dataclass(frozen=True)
class Sample:
    """One generated image as the report uses it: where it comes from and its asset path in the report."""

    kind: str
    step: int | None
    template: str
    prompt: str
    seed: int
    source: Path
    asset: str


class Html(str):
    """Markup assembled here from escaped parts; any other value is escaped when inserted."""


class Num(str):
    """A formatted number: right-aligned in tables like int and float cells."""


def esc(value: Any) -> str:
    return value if isinstance(value, Html) else html.escape(str(value), quote=True)


def model_identity(model_id: str) -> str | None:
    """A location-free identity of a metric model for the key; getting the model later changes it."""
    if not model_id:
        return None
    path = cached_folder(model_id)
    return f"unavailable:{model_id}" if path is None else component_identity(path, "")


def stage_key_for(cfg: ReportSection, inputs: ReportInputs) -> str:
    """Upstream keys, the metric models' identities and the run name; never timings, settings or paths."""
    settings = cfg.keyed(without=MODEL_SETTINGS)
    return stage_key(
        STAGE,
        CODE_VERSION,
        settings,
        metric_models={"clip": model_identity(cfg.clip_model), "dino": model_identity(cfg.dino_model)},
        analyser_version=_analyser_version(cfg.analyser),
        preprocess=inputs.preprocess.key,
        class_images=inputs.class_images.key if inputs.class_images else None,
        train=inputs.train.key,
        generate=inputs.generate.key,
        run_name=inputs.run_name,
    )


def _read_csv(path: Path, stage: str) -> list[dict[str, str]]:
    """Rows as strings exactly as written: a prompt such as "NA" or "None" stays text."""
    if not path.is_file():
        raise StageError(STAGE, f"the {stage} output lacks {path.name}; rerun `boothflow stage {stage}`", str(path))
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def read_samples(generate: Path) -> list[Sample]:
    """The generate stage's samples.csv, each row pointing at its image and its place under assets/samples/."""
    samples = []
    for row in _read_csv(generate / "samples.csv", "generate"):
        step = int(float(row["step"])) if row["step"] else None
        asset = f"assets/samples/{_safe_name(row['id'])}.png"
        samples.append(
            Sample(row["kind"], step, row["template"], row["prompt"], int(row["seed"]), generate / row["image"], asset)
        )
    return samples


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


def _analyser_version(name: str) -> int | None:
    if not name:
        return None
    from tasks.toy import score

    return score.VERSION


def _token_pattern(token: str) -> re.Pattern[str]:
    """The identifier as a word of a prompt (`sks,` included, `asks` not)."""
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")


def _clip_text(prompt: str, token: str) -> str:
    """The text CLIP-T compares an image with: its prompt without the identifier token, which CLIP never saw."""
    if token:
        prompt = _token_pattern(token).sub(" ", prompt)
    return " ".join(prompt.split())


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output whose pooler_output is the projected embedding; 4.x the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class MetricsUnavailable(Exception):
    """A metric model that is not set, not found or not loadable; str() tells the user how to set it."""


def load_metric_model(model: MetricModel, model_id: str, device: torch.device) -> tuple[Any, Any]:
    """(network, processor) for CLIP (CLIPModel, CLIPProcessor) or DINO (AutoModel, AutoImageProcessor)."""
    how = f"set {model.setting} to a hub id or folder, e.g. --set {model.setting}={model.example}"
    if not model_id:
        raise MetricsUnavailable(f"{model.scores}: no model; {how}")
    path = cached_folder(model_id)
    if path is None:
        raise MetricsUnavailable(
            f"{model.scores}: {model.setting} = {model_id!r} is neither a folder nor in the local Hugging Face "
            f"cache; download it once (hf download {model_id}) or {how}"
        )
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    try:
        if model is CLIP:
            return loaded(CLIPModel.from_pretrained(path).eval().to(device)), CLIPProcessor.from_pretrained(path)
        return loaded(AutoModel.from_pretrained(path).eval().to(device)), AutoImageProcessor.from_pretrained(path)
    except Exception as err:
        line = (str(err).splitlines() or [""])[0][:200]
        raise MetricsUnavailable(
            f"{model.scores}: {model.setting} = {model_id!r} cannot be loaded ({type(err).__name__}: {line}); {how}"
        ) from err


@torch.inference_mode()
def image_embeddings(
    model: MetricModel, network: Any, processor: Any, paths: Sequence[Path], device: torch.device
) -> dict[Path, torch.Tensor]:
    """Unit-length embedding of each image: CLIP's projected image embedding, or a DINO ViT's CLS token."""
    found: dict[Path, torch.Tensor] = {}
    batches = batched(list(dict.fromkeys(paths)), EMBED_BATCH)
    for batch in track(batches, len(batches), f"report: {model.name} image embeddings"):
        pixels = processor(images=[_open_rgb(p) for p in batch], return_tensors="pt")["pixel_values"].to(device)
        if model is CLIP:
            vectors = _features(network.get_image_features(pixel_values=pixels))
        else:
            vectors = network(pixel_values=pixels).last_hidden_state[:, 0]
        found.update(zip(batch, torch.nn.functional.normalize(vectors.float(), dim=-1).cpu(), strict=True))
    return found


@torch.inference_mode()
def text_embeddings(
    network: Any, processor: Any, texts: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Unit-length CLIP text embedding of each text (truncated to CLIP's 77 tokens)."""
    found: dict[str, torch.Tensor] = {}
    for batch in batched(list(dict.fromkeys(texts)), EMBED_BATCH):
        tokens = processor(text=list(batch), padding=True, truncation=True, return_tensors="pt").to(device)
        vectors = _features(network.get_text_features(**tokens))
        found.update(zip(batch, torch.nn.functional.normalize(vectors.float(), dim=-1).cpu(), strict=True))
    return found


def mean_cosine(left: list[torch.Tensor], right: list[torch.Tensor], skip_same: bool = False) -> float | None:
    """Mean cosine over every (left, right) pair of unit vectors; `skip_same` leaves out each vector with itself."""
    if not left or not right or (skip_same and len(left) < 2):
        return None
    scores = torch.stack(left) @ torch.stack(right).T
    return float(scores[~torch.eye(len(left), dtype=torch.bool)].mean() if skip_same else scores.mean())


def _group_label(kind: str, step: int | None) -> str:
    return f"checkpoint step {step}" if kind == "checkpoint" else KIND_LABELS.get(kind, kind)


def compute_metrics(
    cfg: ReportSection, samples: list[Sample], instance: list[Path], token: str
) -> tuple[dict[str, Any], list[str]]:
    """The DreamBooth paper's scores per group of samples, each a mean cosine similarity: CLIP-T (image vs its
    prompt), CLIP-I and DINO (image vs every instance image); the instance images against each other are the
    reference row. Returns them and the names of the models loaded; a missing model is a message, not an error."""
    device = accelerator()
    groups: dict[tuple[str, int | None], list[Sample]] = {}
    for sample in _in_group_order(samples):
        groups.setdefault((sample.kind, sample.step), []).append(sample)
    empty = {"clip_t": None, "clip_i": None, "dino": None}
    rows = [
        {"group": _group_label(kind, step), "kind": kind, "step": step, "images": len(members), **empty}
        for (kind, step), members in groups.items()
    ]
    reference = {"group": "instance images (reference)", "kind": "instance", "step": None, "images": len(instance)}
    reference.update(empty)
    missing, loaded = [], []
    for model, model_id in ((CLIP, cfg.clip_model), (DINO, cfg.dino_model)):
        try:
            network, processor = load_metric_model(model, model_id, device)
        except MetricsUnavailable as err:
            missing.append(str(err))
            continue
        loaded.append(model.name)
        vectors = image_embeddings(model, network, processor, instance + [s.source for s in samples], device)
        ref = [vectors[p] for p in instance]
        score = "clip_i" if model is CLIP else "dino"
        for row, members in zip(rows, groups.values(), strict=True):
            row[score] = mean_cosine([vectors[s.source] for s in members], ref)
        reference[score] = mean_cosine(ref, ref, skip_same=True)
        if model is CLIP:
            texts = text_embeddings(network, processor, [_clip_text(s.prompt, token) for s in samples], device)
            for row, members in zip(rows, groups.values(), strict=True):
                pairs = [float(vectors[s.source] @ texts[_clip_text(s.prompt, token)]) for s in members]
                row["clip_t"] = sum(pairs) / len(pairs)
    analysed = analyser_scores(samples, token) if cfg.analyser == "toy" else []
    for row in rows:
        prompts = [a for a in analysed if (a["kind"], a["step"]) == (row["kind"], row["step"]) and a["token"]]
        images = sum(a["images"] for a in prompts)
        row["subject"] = sum(a["subject"] * a["images"] for a in prompts) / images if images else None
    models = {"clip": cfg.clip_model, "dino": cfg.dino_model}
    rows = [*rows, reference | {"subject": None}] if instance else rows
    return {"rows": rows, "missing": missing, "models": models, "analyser": analysed}, loaded


def _in_group_order(samples: list[Sample]) -> list[Sample]:
    """Fine-tuned, base, then checkpoints by step: the order of the metrics tables."""
    order = list(KIND_LABELS)
    return sorted(samples, key=lambda s: (order.index(s.kind) if s.kind in order else len(order), s.step or 0))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def analyser_scores(samples: list[Sample], token: str) -> list[dict[str, Any]]:
    """The toy analyser per group and prompt: the share of images that show the subject, and the share that show
    every colour, shape and background the prompt names."""
    from tasks.toy.score import matches, parse, read

    names_token = _token_pattern(token)
    grouped: dict[tuple[str, int | None, str], list[Sample]] = {}
    for sample in _in_group_order(samples):
        grouped.setdefault((sample.kind, sample.step, sample.prompt), []).append(sample)
    rows = []
    for (kind, step, prompt), members in grouped.items():
        readings = [read(_open_rgb(s.source)) for s in members]
        checks = [matches(r, parse(prompt)) for r in readings]
        rows.append(
            {
                "group": _group_label(kind, step),
                "kind": kind,
                "step": step,
                "prompt": prompt,
                "token": bool(names_token.search(prompt)),
                "images": len(members),
                "subject": _mean([float(r.subject) for r in readings]),
                "words": _mean([float(c["all"]) for c in checks if c]),
            }
        )
    return rows


# ---- HTML: every value goes through esc() unless it is Html built here from escaped parts ----

CSS = """
:root { --fg: #1c2430; --muted: #5a6475; --line: #cfd6df; --head: #eef2f7; --accent: #1f4e8c; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1b2a3d; color: #fff; padding: 22px 40px 14px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; }
header p { margin: 0 0 10px; color: #c9d6e8; }
nav a { color: #a9c8ff; margin-right: 16px; text-decoration: none; font-size: 14px; }
main { max-width: 1240px; margin: 0 auto; padding: 4px 40px 24px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 24px 18px;
  margin: 22px 0; }
h2 { margin: 0 0 12px; font-size: 20px; color: var(--accent); border-bottom: 1px solid var(--line);
  padding-bottom: 6px; }
h3 { margin: 18px 0 6px; font-size: 16px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody th { background: #f8f9fb; font-weight: 500; }
table.facts th { width: 200px; font-weight: 600; }
div.settings { columns: 3 340px; column-gap: 24px; }
table.settings { width: 100%; break-inside: avoid; margin: 0 0 14px; font-size: 14px; }
table.settings caption { text-align: left; font-weight: 600; padding: 2px 0 4px; font-family: ui-monospace, monospace; }
table.settings th { width: 48%; cursor: help; }
table.settings td { overflow-wrap: anywhere; white-space: pre-line; }
tbody th { vertical-align: middle; }
.key { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figure img, .missing { display: block; width: 150px; height: 150px; object-fit: cover; background: #e8ebef;
  border: 1px solid var(--line); border-radius: 4px; }
.missing { display: flex; align-items: center; justify-content: center; text-align: center; padding: 8px;
  color: var(--muted); font-size: 12px; border-style: dashed; }
figcaption { font-size: 12px; color: var(--muted); max-width: 306px; overflow-wrap: anywhere; margin-top: 3px; }
.pair { display: flex; gap: 6px; }
.pair span { display: block; font-size: 11px; color: var(--muted); text-transform: uppercase; }
img.plot { display: block; max-width: 100%; border: 1px solid var(--line); border-radius: 4px; }
.muted { color: var(--muted); }
.note { background: #fff7e0; border: 1px solid #ecd38a; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
footer { max-width: 1240px; margin: 0 auto; padding: 0 40px 30px; color: var(--muted); font-size: 13px; }
"""
# No network and no script, ever: images come from files beside the page (or its own http origin when served).
CSP = "default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'"


def _img(src: str, alt: str, css: str = "") -> Html:
    attribute = f' class="{css}"' if css else ""
    return Html(f'<img{attribute} src="{esc(quote(src))}" alt="{esc(alt)}">')


def _figure(src: str | None, alt: str, caption: str) -> Html:
    picture = _img(src, alt) if src else Html(f'<div class="missing">{esc(alt)}</div>')
    return Html(f"<figure>{picture}<figcaption>{esc(caption)}</figcaption></figure>")


def _cell(value: Any) -> str:
    if isinstance(value, Num | int | float) and not isinstance(value, bool):
        return f'<td class="num">{esc(value)}</td>'
    return f"<td>{esc(value)}</td>"


def _table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], css: str = "") -> Html:
    """A bordered table whose first column names its rows; numbers are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        f'<tr><th scope="row">{esc(row[0])}</th>' + "".join(_cell(c) for c in row[1:]) + "</tr>" for row in rows
    )
    attribute = f' class="{css}"' if css else ""
    return Html(f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _facts_table(pairs: Iterable[tuple[str, Any]]) -> Html:
    rows = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in pairs)
    return Html(f'<table class="facts"><tbody>{rows}</tbody></table>')


def _p(text: str, css: str = "") -> Html:
    return Html(f'<p class="{css}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>")


def _section(section_id: str, title: str, *parts: str) -> Html:
    return Html(f'<section id="{section_id}"><h2>{esc(title)}</h2>{"".join(parts)}</section>')


def _number(value: Any, digits: int = 3) -> str:
    return Num("—" if value is None else f"{float(value):.{digits}f}")


def _plain(value: Any) -> str:
    """A settings value as a person reads it: a list one item per line, empty values named."""
    if isinstance(value, list | tuple):
        return "\n".join(_plain(v) for v in value) if value else "(none)"
    return "(empty)" if value is None or value == "" else str(value)


def _meaning(section: str, name: str) -> str:
    """The setting's one-line description from the config models."""
    outer = RunConfig.model_fields.get(section)
    inner = getattr(getattr(outer, "annotation", None), "model_fields", {}).get(name)
    return (inner.description or "") if inner is not None else ""


def settings_section(settings: dict[str, Any]) -> Html:
    """The resolved config as one small table per TOML section; a name's tooltip is its description."""
    tables = []
    for section, values in settings.items():
        fields = values if isinstance(values, dict) else {section: values}
        rows = "".join(
            f'<tr><th scope="row" title="{esc(_meaning(section, name))}">{esc(name)}</th>'
            f"<td>{esc(_plain(value))}</td></tr>"
            for name, value in fields.items()
        )
        tables.append(f'<table class="settings"><caption>[{esc(section)}]</caption><tbody>{rows}</tbody></table>')
    text = _p("The resolved configuration of this run, as in the TOML file; hover a name for what it does.", "muted")
    return _section("settings", "Settings", text, Html(f'<div class="settings">{"".join(tables)}</div>'))


def stages_section(stages: dict[str, Any]) -> Html:
    def count(value: Any) -> Any:
        return "—" if value is None else value

    rows = [
        (
            name,
            info.get("status", "—"),
            Html(f'<span class="key">{esc(info.get("key") or "—")}</span>'),
            _number(info.get("seconds"), 2),
            count(info.get("items_processed")),
            count(info.get("items_cached")),
            count(info.get("items_rejected")),
            _number(info.get("peak_memory_mb"), 0),
        )
        for name, info in stages.items()
    ]
    headers = ["stage", "status", "key", "seconds", "processed", "cached", "rejected", "peak memory (MB)"]
    note = _p("As recorded by the run that made this report; a cached report keeps that run's table.", "muted")
    return _section("stages", "Stages", _table(headers, rows), note)


def _size_text(raw: str) -> str:
    try:
        width, height = json.loads(raw)
    except (ValueError, TypeError):
        return raw
    return f"{width}×{height}"


def inputs_section(shown: list[dict[str, Any]], rejected: list[dict[str, str]], classes: Html) -> Html:
    figures = []
    for item in shown:
        before = _img(item["before"], f"source {item['source']}") if item["before"] else None
        before = before or Html(f'<div class="missing">{esc(item["before_note"])}</div>')
        after = _img(item["after"], f"cropped {item['source']}")
        caption = f"{item['source']} · {item['size']} · {item['crop']} crop"
        figures.append(
            f'<figure><div class="pair"><div><span>before</span>{before}</div>'
            f"<div><span>after</span>{after}</div></div><figcaption>{esc(caption)}</figcaption></figure>"
        )
    if rejected:
        listing = _table(["file", "reason"], [(r["source"], r["reason"]) for r in rejected])
    else:
        listing = _p("No file was rejected.", "muted")
    return _section(
        "inputs",
        "Instance images",
        _p(f"{len(shown)} usable instance images (before: the source file, upright; after: the training crop)."),
        Html(f'<div class="grid">{"".join(figures)}</div>'),
        Html(f"<h3>Rejected files ({len(rejected)})</h3>"),
        listing,
        classes,
    )


def loss_section(losses: pd.DataFrame, plot: str | None, steps: Any) -> Html:
    if plot is None:
        return _section("loss", "Training loss", _p("No loss was recorded (metrics.csv is empty).", "muted"))
    final, lowest = float(losses["loss"].iloc[-1]), float(losses["loss"].min())
    text = f"{len(losses)} logged steps of {steps}; final loss {final:.4f}, lowest {lowest:.4f}."
    return _section("loss", "Training loss", _img(plot, "training loss per step", "plot"), _p(text))


def _in_order(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def samples_section(samples: list[Sample]) -> Html:
    """One grid per prompt: a row per model (fine-tuned, then base when rendered), a column per seed."""
    shown = [s for s in samples if s.kind in ("finetuned", "base")]
    if not shown:
        return _section("samples", "Samples", _p("The generate stage rendered no samples.", "muted"))
    parts = []
    for template in _in_order(s.template for s in shown):
        mine = [s for s in shown if s.template == template]
        seeds = _in_order(s.seed for s in mine)
        rows = []
        for kind in _in_order(s.kind for s in sorted(mine, key=lambda s: s.kind != "finetuned")):
            by_seed = {s.seed: s for s in mine if s.kind == kind}
            cells = [
                _figure(by_seed[seed].asset, by_seed[seed].prompt, f"{KIND_LABELS[kind]}, seed {seed}")
                if seed in by_seed
                else "—"
                for seed in seeds
            ]
            rows.append((KIND_LABELS[kind], *cells))
        parts += [Html(f"<h3>{esc(mine[0].prompt)}</h3>"), _table(["model", *(f"seed {s}" for s in seeds)], rows)]
    return _section("samples", "Samples", *parts)


def checkpoints_section(samples: list[Sample], steps: Any) -> Html:
    """Validation prompts (first seed) rendered from the weights of each sample step, then from the final ones."""
    checkpoints = [s for s in samples if s.kind == "checkpoint"]
    if not checkpoints:
        text = "No checkpoint samples: set train.sample_every to render the validation prompts during training."
        return _section("checkpoints", "Checkpoints", _p(text, "muted"))
    templates = _in_order(s.template for s in checkpoints)
    found = {(s.step, s.template): s for s in checkpoints}
    seeds = {s.template: s.seed for s in checkpoints}
    final = {s.template: s for s in samples if s.kind == "finetuned" and seeds.get(s.template) == s.seed}
    rows = []
    for step in sorted({s.step for s in checkpoints}):
        cells = [found.get((step, t)) for t in templates]
        rows.append((f"step {step}", *(_figure(s.asset, s.prompt, f"seed {s.seed}") if s else "—" for s in cells)))
    if final:
        cells = [final.get(t) for t in templates]
        rows.append(
            (f"final (step {steps})", *(_figure(s.asset, s.prompt, f"seed {s.seed}") if s else "—" for s in cells))
        )
    headers = ["step", *(next(s.prompt for s in checkpoints if s.template == t) for t in templates)]
    return _section("checkpoints", "Checkpoints", _table(headers, rows))


def analyser_section(rows: list[dict[str, Any]]) -> list[Html]:
    if not rows:
        return []
    table = _table(
        ["samples", "prompt", "images", "shows the subject", "shows the prompt's words"],
        [(r["group"], r["prompt"], r["images"], _percent(r["subject"]), _percent(r["words"])) for r in rows],
    )
    explain = (
        "The toy analyser reads each image in closed form (background, foreground colour, shape, and the subject: a"
        " circle, left half red, right half yellow). For prompts with the identifier the subject column is the hit"
        " rate; for the plain class prompt it is the leak. The words column checks every colour, shape and"
        " background the prompt names."
    )
    return [Html("<h3>Toy analyser</h3>"), table, _p(explain, "muted")]


def _percent(value: float | None) -> str:
    return _number(None) if value is None else Num(f"{100 * value:.0f}%")


def metrics_section(metrics: dict[str, Any]) -> Html:
    analysed = bool(metrics.get("analyser"))
    rows = [
        (row["group"], row["images"], _number(row["clip_t"]), _number(row["clip_i"]), _number(row["dino"]))
        + ((_percent(row.get("subject")),) if analysed else ())
        for row in metrics["rows"]
    ]
    used = ", ".join(f"{name.upper()}: {model_id}" for name, model_id in metrics["models"].items() if model_id)
    explain = (
        "Mean cosine similarities, as in the DreamBooth paper: CLIP-T between each image and its prompt (without "
        "the identifier token); CLIP-I and DINO between each image and every instance image. Higher is closer; the "
        "reference row compares the instance images with each other."
    )
    notes = [Html(f'<p class="note">{esc(message)}</p>') for message in metrics["missing"]]
    return _section(
        "metrics",
        "Metrics",
        _table(["samples", "images", "CLIP-T", "CLIP-I", "DINO", *(["subject (analyser)"] if analysed else [])], rows),
        *analyser_section(metrics.get("analyser", [])),
        *notes,
        _p(explain, "muted"),
        _p(f"Models: {used}." if used else "Models: none set.", "muted"),
    )


def render_page(title: str, key: str, sections: Sequence[Html]) -> str:
    nav = "".join(f'<a href="#{section_id}">{section_id}</a>' for section_id in SECTIONS)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · boothflow report</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>boothflow DreamBooth report</p><nav>{nav}</nav></header>"
        f"<main>{''.join(sections)}</main>"
        f'<footer>Report key <span class="key">{esc(key)}</span>. A self-contained folder: report.html and '
        "assets/ open in any browser without a server.</footer></body></html>\n"
    )


# ---- the stage ----


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(STAGE, f"the {stage} output lacks {path.name}; rerun `boothflow stage {stage}`", str(path))
    return json.loads(path.read_text(encoding="utf-8"))


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


def _class_images(classes: StageResult | None, folder: Path) -> tuple[Html, int]:
    """A strip of the first class images, when prior preservation made them; and how many there are."""
    if classes is None:
        return Html(""), 0
    rows = [r for r in _read_csv(classes.path / "items.csv", "class_images") if r["status"] == "ok"]
    figures = []
    for row in rows[:CLASS_IMAGES_SHOWN]:
        asset = f"assets/class/{_safe_name(row['id'])}.png"
        link_or_copy(classes.path / row["image"], folder / asset)
        figures.append(_figure(asset, row["prompt"], f"class image {row['index']}"))
    prompt = rows[0]["prompt"] if rows else ""
    heading = Html(f"<h3>Class images ({len(rows)}, prior preservation)</h3>")
    text = _p(f"Prompt: {prompt}; the first {len(figures)} are shown.")
    return Html(heading + text + f'<div class="grid">{"".join(figures)}</div>'), len(rows)


def summary_facts(
    inputs: ReportInputs,
    training: dict[str, Any],
    losses: pd.DataFrame,
    instance_counts: tuple[int, int],
    class_count: int,
    samples: list[Sample],
) -> dict[str, Any]:
    """The facts a reader wants first, keyed by their label on the page."""
    kinds = [s.kind for s in samples]
    template = inputs.settings.get("data", {}).get("instance_prompt", "")
    return {
        "run name": inputs.run_name,
        "base model": inputs.settings.get("model", {}).get("id", "—"),
        "instance prompt": fill_prompt(template, inputs.token, inputs.class_name),
        "token / class": f"{inputs.token} / {inputs.class_name}",
        "training": f"{training.get('method', '—')} fine-tune ({training.get('family', '—')})",
        "steps": training.get("steps"),
        "global batch": _global_batch(training),
        "final loss": float(losses["loss"].iloc[-1]) if len(losses) else None,
        "instance images": f"{instance_counts[0]} used, {instance_counts[1]} rejected",
        "class images": class_count if inputs.class_images else "none (prior preservation off)",
        "samples": ", ".join(f"{kinds.count(k)} {KIND_LABELS.get(k, k)}" for k in _in_order(kinds)) or "none",
    }


def _global_batch(training: dict[str, Any]) -> str:
    """Images per optimizer step, and how they were split (processes share the batch; see train.num_processes)."""
    if "global_batch" not in training:
        return "—"
    parts = (f"{training['batch_size']} per process x {training['grad_accum']} accumulation"
             f" x {training['num_processes']} process{'es' if training['num_processes'] > 1 else ''}")  # fmt: skip
    return f"{training['global_batch']} ({parts})"


def _writer(cfg: ReportSection, inputs: ReportInputs, key: str) -> Callable[[Path], dict[str, Any]]:
    """The entry's writer: assets (linked images, thumbnails, loss plot), metrics, then report.html and report.json."""

    def build(folder: Path) -> dict[str, Any]:
        for sub in ("inputs", "samples", "class"):
            (folder / "assets" / sub).mkdir(parents=True)
        training = _read_json(inputs.train.path / "training.json", "train")
        losses = read_losses(inputs.train.path)
        items = _read_csv(inputs.preprocess.path / "items.csv", "preprocess")
        usable = [r for r in items if r["status"] == "ok"]
        rejected = [r for r in items if r["status"] != "ok"]
        samples = read_samples(inputs.generate.path)
        for sample in samples:
            if not sample.source.is_file():
                raise StageError(STAGE, "the generate output lacks this image; rerun generate", str(sample.source))
            if not (folder / sample.asset).exists():
                link_or_copy(sample.source, folder / sample.asset)
        shown = [_add_input(row, inputs.instance_dir, inputs.preprocess.path, folder) for row in usable]
        classes, class_count = _class_images(inputs.class_images, folder)
        plot = None
        if len(losses):
            plot = "assets/loss.png"
            plot_loss(losses, folder / plot)
        instance = [inputs.preprocess.path / row["image"] for row in usable]
        metrics, loaded = compute_metrics(cfg, samples, instance, inputs.token)

        steps = training.get("steps")
        summary = summary_facts(inputs, training, losses, (len(usable), len(rejected)), class_count, samples)
        shown_summary = {**summary, "final loss": _number(summary["final loss"], 4)}
        page = render_page(
            f"{inputs.run_name}: {summary['instance prompt']}",
            key,
            [
                _section("summary", "Summary", _facts_table(shown_summary.items())),
                settings_section(inputs.settings),
                stages_section(inputs.stages),
                inputs_section(shown, rejected, classes),
                loss_section(losses, plot, steps),
                samples_section(samples),
                checkpoints_section(samples, steps),
                metrics_section(metrics),
            ],
        )
        (folder / "report.html").write_text(page, encoding="utf-8")
        listed = [
            {"kind": s.kind, "step": s.step, "prompt": s.prompt, "seed": s.seed, "image": s.asset} for s in samples
        ]
        facts = {"key": key, "html": "report.html", "summary": summary, "metrics": metrics, "samples": listed}
        (folder / "report.json").write_text(json.dumps(facts, indent=1, ensure_ascii=False), encoding="utf-8")
        images = sum(1 for f in (folder / "assets").rglob("*") if f.is_file())
        return {"items": images, "models_loaded": loaded}

    return build


def build(cfg: ReportSection, inputs: ReportInputs, store: Store, key: str) -> StageResult:
    """Write the report folder; metric models load only here."""
    entry = store.get_or_create(STAGE, key, _writer(cfg, inputs, key), cfg.keyed())
    if not entry.created:  # another run wrote it while this one waited for the lock
        return StageResult.cached(entry)
    loaded = tuple(entry.info["models_loaded"])
    return StageResult(STAGE, key, entry.path, items_processed=entry.info["items"], models_loaded=loaded)


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
