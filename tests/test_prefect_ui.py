"""The suite's real Prefect UI in Debian's chromium (through Playwright): a fully cached rerun shows a Cached badge on
every stage and its report artifacts, and the deployment from prefect.yaml gets a run form built from RunConfig.

Prefect 3.9.1 serves two UI builds: v1 (Vue) at "/" and v2 (React) at "/v2", and sends a browser without a saved
preference to v2 (`/ui-settings` says `default_ui`). These tests drive v2 routes: `/runs/flow-run/<id>?tab=...`,
`/artifacts/artifact/<id>` and `/deployments/deployment/<id>/run`. Requests that do not go to 127.0.0.1 (the UI's
analytics) are refused, so the tests run offline. Skips without a browser, except under CI=true.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser import chromium
from processes import run

from tasks.core.config import RunConfig

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = ["--set", "train.steps=3", "--set", "train.checkpoint_every=0", "--set", "train.sample_every=0",
         "--set", "generate.steps=2", "--set", "generate.seeds=[0]"]  # fmt: skip
STAGES = ("preprocess", "latents", "train", "export", "generate", "evaluate", "report")
ARTIFACT_KEYS = ("run-summary", "stage-summary", "report-samples", "report-link")
TIMEOUT_MS = 30_000  # first paint of a route, including its lazily loaded chunks, on a busy 2-core machine


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def ui(prefect_server: str) -> str:
    """Base URL of the UI build the server sends a browser to by default (v2 for Prefect 3.9.1)."""
    origin = prefect_server.removesuffix("/api")
    settings = _get_json(f"{origin}/ui-settings")
    assert settings["api_url"] == prefect_server  # the UI talks to this server, not to port 4200
    assert settings["default_ui"] == "v2", settings  # the routes below are the React (v2) UI's
    return origin + settings["v2_base_url"].rstrip("/")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, prefect_server: str):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/])"), lambda route: route.abort())  # offline
    yield context.new_page()
    context.close()
    expect.set_options(timeout=None)  # back to Playwright's default for other tests


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def artifact_http(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An artifact root served over http, as `boothflow ui` serves it: the UI strips file:// links from markdown."""
    root = tmp_path / "a"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_cached_rerun_shows_cached_badges_and_report_artifacts(boothflow, ui: str, page, artifact_http,
                                                               tmp_path: Path) -> None:  # fmt: skip
    from playwright.sync_api import expect

    root, artifacts_url = artifact_http
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    args = ["run", "--config", "configs/demo.toml", "--artifacts", root, "--set", f"data.instance_dir='{images}'",
            *QUICK]  # fmt: skip
    boothflow(*args, "--summary", tmp_path / "1.json")
    boothflow(*args, "--summary", tmp_path / "2.json", env={"BOOTHFLOW_ARTIFACTS_URL": artifacts_url})
    summary = json.loads((tmp_path / "2.json").read_text())
    assert {s: summary["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "cached")
    run_id, html = summary["run"]["flow_run_id"], Path(summary["outputs"]["report_html"])

    # The run page's Task Runs tab: one card per stage, each with the state badge "Cached".
    page.goto(f"{ui}/runs/flow-run/{run_id}?tab=TaskRuns")
    expect(page.get_by_text(f"({len(STAGES)} Cached)")).to_be_visible()
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()  # the flow run's own state
    cards = page.locator("[data-slot=card]")
    for stage in STAGES:
        card = cards.filter(has=page.get_by_role("link", name=re.compile(rf"^{stage}-")))
        expect(card).to_have_count(1)
        expect(card.locator("[data-slot=badge]")).to_have_text("Cached")
    page.screenshot(path=tmp_path / "flow-run-task-runs.png", full_page=True)

    # The Artifacts tab: the four artifacts publish.py creates on every run, a fully cached one included.
    page.get_by_role("tab", name="Artifacts").click()
    expect(page).to_have_url(re.compile(r"tab=Artifacts"))
    for key in ARTIFACT_KEYS:
        expect(page.get_by_role("link", name=re.compile(rf"\b{key}\b"))).to_be_visible()
    page.screenshot(path=tmp_path / "flow-run-artifacts.png", full_page=True)

    # run-summary: the markdown, rendered, says every stage was cached and no model was loaded.
    page.get_by_role("link", name=re.compile(r"\brun-summary\b")).click()
    expect(page).to_have_url(re.compile(r"/artifacts/artifact/[0-9a-f-]{36}"))
    markdown = page.get_by_test_id("markdown-display")  # the rendered view; "Raw" is another, hidden one
    expect(markdown.get_by_role("heading", name="boothflow run demo")).to_be_visible()
    expect(markdown.get_by_text("Models loaded: none (every model-using stage was cached)")).to_be_visible()
    for stage in STAGES:
        row = markdown.get_by_role("row").filter(has=page.get_by_role("cell", name=stage, exact=True))
        expect(row.get_by_role("cell", name="cached", exact=True)).to_be_visible()
    page.screenshot(path=tmp_path / "run-summary.png", full_page=True)

    # report-link: an http link to the report (served like `boothflow ui` does) that opens the report.
    page.go_back()
    page.get_by_role("link", name=re.compile(r"\breport-link\b")).click()
    link = page.get_by_role("link", name=f"report: {html}")
    link_href = f"{artifacts_url}{html.relative_to(root.resolve()).as_posix()}"
    expect(link).to_have_attribute("href", link_href)
    page.screenshot(path=tmp_path / "report-link.png")
    link.click()
    expect(page).to_have_url(link_href)
    expect(page.get_by_role("heading", level=1)).to_have_text("demo: a photo of sks toy")  # run name: prompt
    expect(page.locator("#stages")).to_contain_text("generate")


def test_deployment_run_form_shows_run_config_sections_and_descriptions(cli_env: dict, ui: str, page,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    from playwright.sync_api import expect

    prefect = str(BIN / "prefect")  # the pool may exist already (test_operate deploys too)
    run([prefect, "work-pool", "create", "boothflow-process", "--type", "process"], cwd=REPO, env=cli_env,
        capture_output=True)  # fmt: skip
    deployed = run([prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=cli_env, capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment = _get_json(f"{cli_env['PREFECT_API_URL']}/deployments/name/dreambooth/nightly-worker")

    page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
    expect(page.get_by_text("Peak learning rate")).to_be_visible()  # the schema form has rendered
    expect(page.get_by_text("boothflow-process").first).to_be_visible()
    expect(page.get_by_text("config (Optional)", exact=True)).to_be_visible()
    expect(page.get_by_text(RunConfig.model_json_schema()["description"], exact=True)).to_be_visible()
    for name, field in RunConfig.model_fields.items():  # run, model, data, preprocess, prior, ..., report
        title = page.get_by_text(f"{field.annotation.__name__} (Optional)", exact=True)
        expect(title, f"section {name}: its title").to_be_visible()
        expect(page.get_by_text(field.description, exact=True), f"section {name}: its description").to_be_visible()

    shown = " ".join(page.locator("form").first.inner_text().split())
    missing = [
        f"{name}.{key}: {info.description}"
        for name, field in RunConfig.model_fields.items()
        for key, info in field.annotation.model_fields.items()
        if " ".join(info.description.split()) not in shown
    ]
    assert not missing, missing
    # prefilled with prefect.yaml's parameters, not the schema defaults (learning_rate 5e-6, resolution 512)
    expect(page.get_by_label("Learning Rate (Optional)", exact=True)).to_have_value("0.0001")
    expect(page.get_by_label("Resolution (Optional)", exact=True)).to_have_value("64")
    page.screenshot(path=tmp_path / "run-form.png")  # its top: Run Name, config, RunSection, ModelSection
    page.screenshot(path=tmp_path / "run-form-full.png", full_page=True)
    page.get_by_text("TrainSection (Optional)", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
    page.screenshot(path=tmp_path / "run-form-train.png")
