"""`boothflow ui`: a local Prefect server whose UI talks to its own port, plus the artifact root over http."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from processes import started

from flows.server import free_port

pytestmark = pytest.mark.server  # `boothflow ui` starts one

REPO = Path(__file__).resolve().parents[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_ui_serves_prefect_on_its_port_and_the_artifact_root(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "report" / "k").mkdir(parents=True)
    (root / "report" / "k" / "report.html").write_text("<h1>hello report</h1>")
    port = free_port()
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "home")}
    command = [Path(sys.executable).parent / "boothflow", "ui", "--port", port, "--artifacts", root]
    log, record = tmp_path / "ui.log", root / ".boothflow-ui.json"
    with started(command, grace=60, log=log, cwd=REPO, env=env) as ui:
        deadline = time.monotonic() + 120
        while not record.is_file():
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text() if ui.poll() else "timeout"
            time.sleep(0.5)
        urls = json.loads(record.read_text())
        assert urls["api_url"] == f"http://127.0.0.1:{port}/api"
        assert _get(f"{urls['api_url']}/health").strip() == b"true"
        settings = json.loads(_get(f"http://127.0.0.1:{port}/ui-settings"))
        assert settings["api_url"] == urls["api_url"]  # the browser UI calls this server, not port 4200
        assert _get(f"{urls['artifacts_url']}/report/k/report.html") == b"<h1>hello report</h1>"
    output = log.read_text()  # what it said before and as it stopped (SIGTERM)
    assert f"Prefect UI: http://127.0.0.1:{port}" in output and "export PREFECT_API_URL=" in output
    assert not record.exists()
