"""DreamBooth in the toy world, through boothflow's own stages and the CLI: configs/toy.toml teaches the shipped
toy-sd model a subject it never saw, and prior preservation keeps it out of plain class prompts.

Rates are read by the toy analyser from the samples the flow wrote: 64 seeds per prompt and model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from browser import chromium
from diffusers import StableDiffusionPipeline
from PIL import Image

from tasks.sd.models import resolve
from tasks.sd.presets import SHIPPED_FOLDER
from tasks.toy.figures import (
    BASE_KNOWS_NOTHING,
    IN_CONTEXT,
    KEPT_OUT,
    LEAKS_WITHOUT_PRIOR,
    LEARNED,
    SAMPLES_PER_RATE,
    SUBJECT,
    WITHOUT_PRIOR,
    Figure,
    readings,
)
from tasks.toy.score import Reading, read


@pytest.fixture(scope="module")
def runs(boothflow, toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy flow as configs/toy.toml sets it (prior preservation on) and without prior preservation, on the
    session's toy artifact root; returns each run's report folder."""
    summaries, reports = tmp_path_factory.mktemp("toy-dreambooth"), {}
    for name, extra in (("prior", []), ("no prior", [x for s in WITHOUT_PRIOR for x in ("--set", s)])):
        summary = summaries / f"{name}.json"
        boothflow("run", "-c", "configs/toy.toml", "--artifacts", toy_root, *extra, "--summary", summary)
        reports[name] = Path(json.loads(summary.read_text())["outputs"]["report_html"]).parent
    return reports


def counted(found: dict[tuple[str, str], list[Reading]], figure: Figure) -> tuple[int, int]:
    hits, images = figure.count(found)
    assert images >= SAMPLES_PER_RATE
    return hits, images


def assert_clears(figure: Figure, hits: int, images: int) -> None:
    """With one image to spare: one image read the other way cannot fail it."""
    assert figure.spare(hits, images) >= 1, f"{figure.name}: {hits} of {images}, threshold {figure.threshold}"


def test_the_base_model_does_not_know_the_subject_and_fine_tuning_teaches_it(runs: dict[str, Path]) -> None:
    found = readings(runs["prior"])
    for figure in (BASE_KNOWS_NOTHING, LEARNED):
        assert_clears(figure, *counted(found, figure))


def test_the_fine_tuned_subject_follows_a_context_it_never_saw_it_in(runs: dict[str, Path]) -> None:
    assert_clears(IN_CONTEXT, *counted(readings(runs["prior"]), IN_CONTEXT))


def test_prior_preservation_keeps_the_subject_out_of_plain_class_prompts(runs: dict[str, Path]) -> None:
    assert_clears(KEPT_OUT, *counted(readings(runs["prior"]), KEPT_OUT))
    assert_clears(LEAKS_WITHOUT_PRIOR, *counted(readings(runs["no prior"]), LEAKS_WITHOUT_PRIOR))


def test_the_report_shows_the_analysers_rates(runs: dict[str, Path]) -> None:
    found = readings(runs["prior"])
    rows = json.loads((runs["prior"] / "report.json").read_text())["metrics"]["analyser"]
    shown = {(row["kind"], row["prompt"]): row for row in rows}
    for (kind, prompt), members in found.items():
        assert shown[kind, prompt]["subject"] == pytest.approx(sum(r.subject for r in members) / len(members))
        assert shown[kind, prompt]["images"] == len(members)
    html = (runs["prior"] / "report.html").read_text()
    assert "Toy analyser" in html and "subject (analyser)" in html


def test_the_report_in_a_browser_shows_the_subject_learned(runs: dict[str, Path], tmp_path: Path) -> None:
    """What a user sees: the analyser reads the subject prompt's thumbnails as the browser draws them."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((runs["prior"] / "report.html").as_uri(), wait_until="load")
        broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || !e.naturalWidth).length")
        for more in page.locator("#samples summary").all():  # the seeds past report.seeds_shown, as a user opens them
            more.click()
        shown = {}
        for label, kind in (("fine-tuned", "finetuned"), ("base model", "base")):
            figures = page.locator("#samples figure").filter(has=page.locator(f'img[alt="{SUBJECT}"]'))
            shots = [f.locator("img").screenshot() for f in figures.filter(has_text=f"{label}, seed").all()]
            shown[kind, SUBJECT] = [read(Image.open(io.BytesIO(shot))) for shot in shots]
        page.locator("#samples").screenshot(path=str(tmp_path / "samples.png"))
        metrics = page.inner_text("#metrics")
    assert broken == 0
    assert "Toy analyser" in metrics and "shows the subject" in metrics
    for figure in (BASE_KNOWS_NOTHING, LEARNED):
        assert_clears(figure, *counted(shown, figure))


def test_the_shipped_toy_model_loads_with_no_build_step(tmp_path: Path) -> None:
    model = resolve("toy-sd", "", tmp_path)
    assert model.path == SHIPPED_FOLDER / "toy-sd" and model.family == "sd15"
    size = sum(p.stat().st_size for p in model.path.rglob("*.safetensors"))
    assert size <= 20 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(model.path)
    assert pipe.unet.config.sample_size == 16 and pipe.scheduler.config.beta_schedule == "linear"
    card = (model.path / "README.md").read_text()
    assert "boothflow models pretrain-toy" in card and "caption fidelity" in card.lower()
    # nothing was built under the artifact root: only the memo of the model files' hashes was written there
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert written == [".hashes", ".hashes/files.sqlite"]
