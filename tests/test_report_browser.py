"""report.html in a real browser (Debian's chromium through Playwright) at 1280 x 900, with 64 seeds per prompt:
every section shows, every image loads, nothing scrolls sideways, nothing but file:// is requested and a script
prompt stays text. Skips without a browser, except under CI=true.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import chromium
from metric_models import build_clip, build_dino
from test_report import BOLD_FILE, BROKEN_FILE, SCRIPT, TRAIN_STEPS, build_inputs

from tasks.core.config import EvaluateSection, ReportSection
from tasks.core.stage import StageResult
from tasks.core.store import Store
from tasks.sd.models import resolve
from tasks.stages import report, report_page

pytestmark = pytest.mark.browser

SEEDS = range(64)

EXPECTED_TEXT = {
    "summary": ["rory <i>run</i>", "a photo of sks toy", str(TRAIN_STEPS)],
    "settings": ["[generate]", "prompts", "[evaluate]", "clip_model", "[report]", "seeds_shown", "learning_rate"],
    "stages": ["preprocess", "train", "generate", "peak memory (MB)"],
    "inputs": [BOLD_FILE, BROKEN_FILE, "not an image", "before", "after"],
    "loss": ["final loss"],
    "samples": [SCRIPT, "fine-tuned · seeds 0-63", "base model · seeds 0-63", "seed 7", "56 more seeds (8-63)"],
    "checkpoints": ["step 10", "step 20", f"final (step {TRAIN_STEPS})"],
    "metrics": ["CLIP-T", "CLIP-I", "DINO", "fine-tuned", "instance images (reference)"],
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> StageResult:
    root = tmp_path_factory.mktemp("report-browser")
    tokenizer = resolve("tiny-sd15", "", root / "models-root").path / "tokenizer"
    scores = EvaluateSection(
        clip_model=str(build_clip(root / "clip", tokenizer)), dino_model=str(build_dino(root / "dino"))
    )
    return report.run(ReportSection(), build_inputs(root / "run", scores, SEEDS), Store(root / "run" / "artifacts"))


def test_report_opens_offline_in_chromium(made: StageResult, tmp_path: Path) -> None:
    requests: list[str] = []
    dialogs: list[str] = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto((made.path / "report.html").as_uri(), wait_until="load")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        texts = {section: page.inner_text(f"#{section}") for section in report_page.SECTIONS}
        images = page.eval_on_selector_all(
            "img", "elements => elements.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
        )
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        settings_seeds = page.inner_text(
            "#settings table.settings:has(caption:text('[generate]')) tr:has(th:text-is('seeds')) td"
        )
        title = page.title()

    for section, expected in EXPECTED_TEXT.items():
        for text in expected:
            assert text in texts[section], (section, text)
    assert widths[0] == widths[1] == 1280, widths  # no horizontal scrolling (the page has no scroll bar at 1280)
    assert settings_seeds == "0-63"
    # 3 inputs before and after, 2 prompts x 2 models x 64 seeds (8 shown, 56 folded), 3 checkpoints, the loss plot
    assert len(images) == 6 + 2 * 2 * 64 + 3 + 1
    assert all(complete and width > 0 for _, complete, width in images), [i for i in images if not i[1] or not i[2]]
    assert len(requests) == 1 + len({src for src, _, _ in images})  # the page, then each image file once
    assert all(url.startswith("file://") for url in requests), requests
    assert dialogs == [] and title.startswith("rory <i>run</i>")
    assert (tmp_path / "report.png").stat().st_size > 50_000
