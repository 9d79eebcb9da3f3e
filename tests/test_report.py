"""The report stage as a plain function: a self-contained page, metrics with tiny random models, caching, escaping.

Upstream entries are real store entries: preprocess runs for real on a few files; train and generate are written
by hand in their documented layouts, so no test here trains or renders.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from metric_models import build_clip, build_dino
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

from tasks.core.config import EvaluateSection, PreprocessSection, ReportSection, RunConfig, fill_prompt
from tasks.core.stage import StageResult
from tasks.core.store import Store, digest
from tasks.sd.models import resolve
from tasks.stages import evaluate, preprocess, report, report_page
from tasks.stages.report import ReportInputs

TOKEN, CLASS = "sks", "toy"
SCRIPT = "<script>alert(1)</script>"
TEMPLATES = ("a photo of {token} {class}", SCRIPT)
SEEDS = (0, 1)
SAMPLE_STEPS = (10, 20)
TRAIN_STEPS = 40
BOLD_FILE = "photo <b>bold.png"
BROKEN_FILE = "<b>broken.jpg"
SIDEWAYS_FILE = "sideways.jpg"
"""Stored 480x360 with EXIF Orientation 6: upright it is 360x480, so its thumbnail is 192x256."""
STAGES = {
    "preprocess": {"status": "ran", "key": "p" * 24, "seconds": 1.25, "items_processed": 3, "items_cached": 0,
                   "items_rejected": 1, "peak_memory_mb": 312.4},
    "train": {"status": "ran", "key": "t" * 24, "seconds": 95.5, "items_processed": 40, "items_cached": 0,
              "items_rejected": 0, "peak_memory_mb": 2048.0},
    "generate": {"status": "cached", "key": "g" * 24, "seconds": 0.01, "items_processed": 0, "items_cached": 10,
                 "items_rejected": 0},
}  # fmt: skip
ORIENTATION = 0x0112


def _noise(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_instance_dir(folder: Path) -> Path:
    """Three usable images (one sideways by EXIF, one with markup in its name) and one broken file."""
    folder.mkdir(parents=True)
    _noise(1, (320, 240)).save(folder / "red.png")
    _noise(2, (300, 300)).save(folder / BOLD_FILE)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    _noise(3, (480, 360)).save(folder / SIDEWAYS_FILE, exif=exif.tobytes(), quality=95)
    (folder / BROKEN_FILE).write_bytes(b"this is not an image")
    return folder


def fake_train(store: Store) -> StageResult:
    """A train entry with training.json and a falling loss in metrics.csv, written by hand."""
    steps = np.arange(1, TRAIN_STEPS + 1)
    loss = 0.1 + 0.4 * np.exp(-steps / 12) + 0.02 * np.random.default_rng(0).standard_normal(len(steps))

    def build(folder: Path) -> dict[str, Any]:
        training = {"family": "sd15", "method": "full", "steps": TRAIN_STEPS, "sample_steps": list(SAMPLE_STEPS)}
        (folder / "training.json").write_text(json.dumps(training))
        metrics = {"step": steps, "loss": loss, "lr": 5e-6, "seconds": steps * 0.5}
        pd.DataFrame(metrics).to_csv(folder / "metrics.csv", index=False)
        return {}

    key = digest("fake train")[:24]
    return StageResult("train", key, store.get_or_create("train", key, build).path)


def sample_rows(train_key: str, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every prompt x seed fine-tuned and base, and the first template x first seed per sample step."""
    rows = []
    for template in TEMPLATES:
        for seed in seeds:
            rows.append({"kind": "finetuned", "step": None, "template": template, "seed": seed,
                         "model": f"train:{train_key}"})  # fmt: skip
            rows.append({"kind": "base", "step": None, "template": template, "seed": seed, "model": "base:tiny-sd15"})
    for step in SAMPLE_STEPS:
        rows.append({"kind": "checkpoint", "step": step, "template": TEMPLATES[0], "seed": seeds[0],
                     "model": f"train:{train_key}@step-{step}"})  # fmt: skip
    for row in rows:
        row["id"] = digest([row["kind"], row["step"], row["template"], row["seed"]])[:16]
        row["prompt"] = fill_prompt(row["template"], TOKEN, CLASS)
        row["image"] = f"images/{row['id']}.png"
    return rows


def fake_generate(store: Store, train: StageResult, seeds: Sequence[int]) -> StageResult:
    """A generate entry: images/<id>.png (64 px noise) and samples.csv, written by hand."""
    rows = sample_rows(train.key, seeds)

    def build(folder: Path) -> dict[str, Any]:
        (folder / "images").mkdir()
        for i, row in enumerate(rows):
            _noise(100 + i, (64, 64)).save(folder / row["image"])
        columns = ["id", "kind", "step", "template", "prompt", "seed", "model", "image"]
        pd.DataFrame(rows)[columns].to_csv(folder / "samples.csv", index=False)
        return {"items": len(rows)}

    key = digest(["fake generate", train.key, list(seeds)])[:24]
    return StageResult("generate", key, store.get_or_create("generate", key, build).path)


def build_inputs(root: Path, scores: EvaluateSection, seeds: Sequence[int] = SEEDS) -> ReportInputs:
    """Real preprocess output, fake train and generate entries scored by the real evaluate stage, and the run's
    settings and stage table."""
    store = Store(root / "artifacts")
    instance_dir = make_instance_dir(root / "instance")
    cfg = PreprocessSection(resolution=64, min_side=64)
    prepared = preprocess.run(cfg, preprocess.PreprocessInputs(instance_dir, preprocess.scan(instance_dir), 1), store)
    train = fake_train(store)
    config = RunConfig.model_validate(
        {
            "run": {"name": "rory <i>run</i>"},
            "data": {"token": TOKEN, "class_name": CLASS},
            "preprocess": {"resolution": 64},
            "generate": {"seeds": list(seeds)},
        }
    )
    generated = fake_generate(store, train, seeds)
    return ReportInputs(
        run_name=config.run.name,
        settings=config.model_dump(mode="json"),
        stages=STAGES,
        instance_dir=instance_dir,
        preprocess=prepared,
        class_images=None,
        train=train,
        generate=generated,
        evaluate=evaluate.run(scores, evaluate.EvaluateInputs(prepared, generated, TOKEN), store),
        token=TOKEN,
        class_name=CLASS,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def metric_models(root: Path) -> EvaluateSection:
    model = resolve("tiny-sd15", "", root / "models-root")
    clip = build_clip(root / "metric-models" / "clip", model.path / "tokenizer")
    return EvaluateSection(clip_model=str(clip), dino_model=str(build_dino(root / "metric-models" / "dino")))


@pytest.fixture(scope="module")
def inputs(root: Path, metric_models: EvaluateSection) -> ReportInputs:
    return build_inputs(root / "run", metric_models)


@pytest.fixture(scope="module")
def made(inputs: ReportInputs, root: Path) -> StageResult:
    return report.run(ReportSection(seeds_shown=1), inputs, Store(root / "run" / "artifacts"))


class Page(HTMLParser):
    """The parts of report.html that tests check: element ids, <img> sources, tags used, text per section."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.section: str | None = None
        self.text: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.add(tag)
        if "id" in attributes:
            self.ids.append(attributes["id"])
        if tag == "section":
            self.section = attributes["id"]
        if tag == "img":
            self.images.append(attributes["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = None

    def handle_data(self, data: str) -> None:
        if self.section:
            self.text[self.section] = self.text.get(self.section, "") + data


def _page(result: StageResult) -> tuple[str, Page]:
    source = (result.path / "report.html").read_text(encoding="utf-8")
    return source, Page(source)


def test_page_has_every_section_and_only_local_images(made: StageResult, inputs: ReportInputs) -> None:
    assert (made.status, made.models_loaded) == ("ran", ())  # the scores come from the evaluate stage
    assert (inputs.evaluate.status, inputs.evaluate.models_loaded) == ("ran", ("clip", "dino"))
    source, page = _page(made)
    assert [i for i in page.ids if i in report_page.SECTIONS] == list(report_page.SECTIONS)
    # 3 inputs before + after, 4 fine-tuned + 4 base samples, 2 checkpoint steps + the final row, the loss plot
    assert len(page.images) == 6 + 8 + 3 + 1
    entry = made.path.resolve()
    for src in page.images:
        assert "://" not in src and not src.startswith(("/", "\\")) and ".." not in src
        file = (entry / src).resolve()
        assert file.is_relative_to(entry / "assets") and file.is_file(), src
        with Image.open(file) as image:
            assert min(image.size) >= 64
    assert made.items_processed == len(set(page.images)) == 17  # the final checkpoint row reuses a sample
    assert page.tags.isdisjoint({"script", "link", "iframe", "object", "embed", "base"})
    assert not re.search(r"https?:|ftp:|//", source) and "@import" not in source and "url(" not in source


def test_loss_plot_and_summary_numbers(made: StageResult, inputs: ReportInputs) -> None:
    with Image.open(made.path / "assets" / "loss.png") as plot:
        assert plot.format == "PNG" and 600 <= plot.width <= 1200 and 250 <= plot.height <= 600
        pixels = np.asarray(plot.convert("RGB")).astype(int)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # axes, lines, text
    losses = pd.read_csv(inputs.train.path / "metrics.csv")
    _, page = _page(made)
    final = f"{losses['loss'].iloc[-1]:.4f}"
    assert final in page.text["summary"] and final in page.text["loss"]
    assert f"{len(losses)} logged steps of {TRAIN_STEPS}" in page.text["loss"]
    summary = report.report_facts(made.path)["summary"]
    assert summary["steps"] == TRAIN_STEPS and summary["final loss"] == pytest.approx(losses["loss"].iloc[-1])
    assert summary["instance images"] == "3 used, 1 rejected"
    assert summary["samples"] == "4 fine-tuned, 4 base model, 2 checkpoint"
    assert "a photo of sks toy" in page.text["summary"]


def test_inputs_show_upright_sources_crops_and_rejections(made: StageResult, inputs: ReportInputs) -> None:
    items = pd.read_csv(inputs.preprocess.path / "items.csv")
    sideways = items[items["source"] == SIDEWAYS_FILE].iloc[0]
    with Image.open(made.path / "assets" / "inputs" / f"{sideways.source_sha256[:16]}-source.jpg") as before:
        assert before.size == (192, 256)  # 480x360 stored, upright 360x480, thumbnail at most 256
    with Image.open(made.path / "assets" / "inputs" / f"{sideways.source_sha256[:16]}.png") as after:
        assert after.size == (64, 64)
    source, page = _page(made)
    text = page.text["inputs"]
    assert all(name in text for name in ("red.png", BOLD_FILE, SIDEWAYS_FILE))
    assert "Rejected files (1)" in text and BROKEN_FILE in text and "not an image" in text
    assert "&lt;b&gt;broken.jpg" in source and "<b>" not in source


def test_metrics_are_cosines_of_the_tiny_models(
    made: StageResult, metric_models: EvaluateSection, inputs: ReportInputs
) -> None:
    metrics = report.report_facts(made.path)["metrics"]
    assert metrics["missing"] == []
    table = pd.read_csv(inputs.evaluate.path / "metrics.csv")
    assert list(table["group"]) == [row["group"] for row in metrics["rows"]]
    groups = [(row["group"], row["images"]) for row in metrics["rows"]]
    assert groups == [("fine-tuned", 4), ("base model", 4), ("checkpoint step 10", 1), ("checkpoint step 20", 1),
                      ("instance images (reference)", 3)]  # fmt: skip
    _, page = _page(made)
    for row in metrics["rows"]:
        names = ("clip_i", "dino") if row["kind"] == "instance" else ("clip_t", "clip_i", "dino")
        for name in names:
            assert math.isfinite(row[name]) and -1 <= row[name] <= 1, (row["group"], name)
            assert f"{row[name]:.3f}" in page.text["metrics"]
    assert metrics["rows"][-1]["clip_t"] is None

    # The fine-tuned CLIP-I and DINO, recomputed here from their definition with the same tiny models.
    facts = report.report_facts(made.path)
    finetuned = [Path(s["image"]) for s in facts["samples"] if s["kind"] == "finetuned"]
    instance = sorted((made.path / "assets" / "inputs").glob("*[0-9a-f].png"))
    clip = CLIPModel.from_pretrained(metric_models.clip_model).eval()
    processor = CLIPProcessor.from_pretrained(metric_models.clip_model)
    dino = AutoModel.from_pretrained(metric_models.dino_model).eval()
    dino_processor = AutoImageProcessor.from_pretrained(metric_models.dino_model)

    def unit(vectors: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(vectors, dim=-1)

    with torch.inference_mode():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in finetuned + instance], return_tensors="pt")
        clip_vectors = unit(clip.get_image_features(**pixels).pooler_output)
        pixels = dino_processor(
            images=[Image.open(p).convert("RGB") for p in finetuned + instance], return_tensors="pt"
        )
        dino_vectors = unit(dino(**pixels).last_hidden_state[:, 0])
        texts = processor(text=[fill_prompt(t, "", CLASS) for t in TEMPLATES], padding=True, return_tensors="pt")
        text_vectors = unit(clip.get_text_features(**texts).pooler_output)
    row = metrics["rows"][0]
    assert row["clip_i"] == pytest.approx(float((clip_vectors[:4] @ clip_vectors[4:].T).mean()), abs=1e-5)
    assert row["dino"] == pytest.approx(float((dino_vectors[:4] @ dino_vectors[4:].T).mean()), abs=1e-5)
    # samples come as prompt x seed: two images of TEMPLATES[0] (token removed), then two of the script prompt
    expected_t = (clip_vectors[:4] * text_vectors[[0, 0, 1, 1]]).sum(-1).mean()
    assert row["clip_t"] == pytest.approx(float(expected_t), abs=1e-5)


def test_user_text_is_escaped(made: StageResult) -> None:
    source, page = _page(made)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source
    assert "<script" not in source.lower()
    assert SCRIPT in page.text["samples"]
    assert "rory &lt;i&gt;run&lt;/i&gt;" in source and "<i>" not in source
    assert [s["prompt"] for s in report.report_facts(made.path)["samples"]].count(SCRIPT) == 4


def test_samples_and_checkpoint_grids(made: StageResult) -> None:
    """seeds_shown=1: per prompt and model the first seed is shown, the second folds under a disclosure."""
    source, page = _page(made)
    samples = re.search(r'<section id="samples">.*?</section>', source, re.S).group(0)
    assert samples.count("<h3>") == 2 and samples.count("<img") == 8
    assert (
        re.findall(r'<div class="model">([^<]*)</div>', samples)
        == ["fine-tuned · seeds 0-1", "base model · seeds 0-1"] * 2
    )
    assert samples.count("<details>") == 4 and samples.count("<summary>1 more seeds (1)</summary>") == 4
    checkpoints = re.search(r'<section id="checkpoints">.*?</section>', source, re.S).group(0)
    assert [f"step {s}" for s in SAMPLE_STEPS] == re.findall(r'<th scope="row">(step \d+)</th>', checkpoints)
    assert f"final (step {TRAIN_STEPS})" in page.text["checkpoints"] and checkpoints.count("<img") == 3
    stages = page.text["stages"]
    assert all(key in stages for key in ("p" * 24, "t" * 24, "g" * 24)) and "312" in stages and "2048" in stages


def test_seeds_read_as_runs() -> None:
    assert report_page.compact([0, 1, 2, 3, 7, 9, 10]) == "0-3, 7, 9-10"
    assert report_page.compact(range(64)) == "0-63" and report_page.compact([5]) == "5"
    settings = report_page.settings({"generate": {"seeds": list(range(64)), "prompts": ["a", "b"]}})
    assert [row["value"] for row in settings[0]["rows"]] == ["0-63", "a\nb"]


def test_rerun_is_cached_and_a_page_change_scores_nothing(
    made: StageResult, metric_models: EvaluateSection, inputs: ReportInputs, root: Path
) -> None:
    store = Store(root / "run" / "artifacts")
    again = report.run(ReportSection(seeds_shown=1), inputs, store)
    assert (again.status, again.models_loaded, again.key) == ("cached", (), made.key)
    assert (again.items_processed, again.items_cached) == (0, made.items_processed)

    # Another run's timings, settings paths and instance folder location: the same report.
    timings = {name: {**info, "seconds": info.get("seconds", 0) + 7.5} for name, info in STAGES.items()}
    settings = {**inputs.settings, "run": {**inputs.settings["run"], "artifacts_root": "/elsewhere"}}
    moved = replace(inputs, stages=timings, settings=settings, instance_dir=root / "moved")
    assert report.stage_key_for(ReportSection(seeds_shown=1), moved) == made.key
    assert report.run(ReportSection(seeds_shown=1), moved, store).status == "cached"

    # Another page layout: a new report from the same scores, which are not computed again.
    scores = evaluate.run(metric_models, evaluate.EvaluateInputs(inputs.preprocess, inputs.generate, TOKEN), store)
    assert (scores.status, scores.key) == ("cached", inputs.evaluate.key)
    relaid = report.run(ReportSection(), inputs, store)
    assert (relaid.status, relaid.models_loaded) == ("ran", ()) and relaid.key != made.key
    assert report.report_facts(relaid.path)["metrics"] == report.report_facts(made.path)["metrics"]


def test_keys_follow_upstream_keys_run_name_and_model_content(
    metric_models: EvaluateSection, inputs: ReportInputs, tmp_path: Path
) -> None:
    key = report.stage_key_for(ReportSection(), inputs)
    changed = {
        "generate": replace(inputs, generate=replace(inputs.generate, key="0" * 24)),
        "train": replace(inputs, train=replace(inputs.train, key="1" * 24)),
        "preprocess": replace(inputs, preprocess=replace(inputs.preprocess, key="2" * 24)),
        "evaluate": replace(inputs, evaluate=replace(inputs.evaluate, key="3" * 24)),
        "class_images": replace(inputs, class_images=replace(inputs.generate, stage="class_images")),
        "run_name": replace(inputs, run_name="other"),
    }
    keys = {name: report.stage_key_for(ReportSection(), changed_inputs) for name, changed_inputs in changed.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys)

    # The scores' key: the same model files elsewhere give the same key (no folder path in it); one changed file,
    # another key.
    scored = evaluate.EvaluateInputs(inputs.preprocess, inputs.generate, TOKEN)
    score_key = evaluate.stage_key_for(metric_models, scored)
    copy = shutil.copytree(metric_models.dino_model, tmp_path / "dino copy")
    moved = metric_models.model_copy(update={"dino_model": str(copy)})
    assert evaluate.stage_key_for(moved, scored) == score_key
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    assert evaluate.stage_key_for(moved, scored) != score_key
    assert evaluate.stage_key_for(EvaluateSection(), scored) != score_key
    assert evaluate.stage_key_for(metric_models, replace(scored, token="zwx")) != score_key


def fake_class_images(store: Store, count: int) -> StageResult:
    """A class_images entry: images/<id>.png and items.csv (id, index, seed, prompt, status, image)."""
    ids = [digest(["class", index])[:16] for index in range(count)]

    def build(folder: Path) -> dict[str, Any]:
        (folder / "images").mkdir()
        for index, image_id in enumerate(ids):
            _noise(200 + index, (64, 64)).save(folder / "images" / f"{image_id}.png")
        table = {"id": ids, "index": range(count), "seed": range(count), "prompt": "a photo of toy", "status": "ok"}
        pd.DataFrame({**table, "image": [f"images/{i}.png" for i in ids]}).to_csv(folder / "items.csv", index=False)
        return {"items": count}

    key = digest(["fake class images", count])[:24]
    return StageResult("class_images", key, store.get_or_create("class_images", key, build).path)


def test_missing_models_are_named_in_the_metrics_section(inputs: ReportInputs, tmp_path: Path) -> None:
    store = Store(tmp_path / "artifacts")

    def scored(cfg: EvaluateSection) -> StageResult:
        return evaluate.run(cfg, evaluate.EvaluateInputs(inputs.preprocess, inputs.generate, TOKEN), store)

    unscored = scored(EvaluateSection())
    assert unscored.models_loaded == ()
    with_classes = replace(inputs, class_images=fake_class_images(store, 10), evaluate=unscored)
    empty = report.run(ReportSection(), with_classes, store)
    source, page = _page(empty)
    assert "Class images (10, prior preservation)" in page.text["inputs"]
    assert len(re.findall(r'<img src="assets/class/[0-9a-f]{16}\.png"', source)) == report.CLASS_IMAGES_SHOWN
    assert report.report_facts(empty.path)["summary"]["class images"] == 10
    text = page.text["metrics"]
    assert "evaluate.clip_model" in text and "evaluate.dino_model" in text and "--set evaluate.clip_model=" in text
    rows = report.report_facts(empty.path)["metrics"]["rows"]
    assert all(row[name] is None for row in rows for name in ("clip_t", "clip_i", "dino"))
    assert text.count("—") == 3 * len(rows)

    not_a_model = tmp_path / "not a model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config here")
    broken = scored(EvaluateSection(clip_model="no-such-org/no-such-clip", dino_model=str(not_a_model)))
    assert broken.models_loaded == ()
    missing = json.loads((broken.path / "metrics.json").read_text())["missing"]
    assert "evaluate.clip_model = 'no-such-org/no-such-clip' is neither a folder nor in the local" in missing[0]
    assert "evaluate.dino_model" in missing[1] and "cannot be loaded" in missing[1]
