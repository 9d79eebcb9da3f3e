"""The local file server behind report links serves the artifact root and nothing else."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.operate import serve_files
from flows.server import free_port


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def served(tmp_path: Path):
    root, outside = tmp_path / "artifacts", tmp_path / "secret"
    (root / "report" / "k").mkdir(parents=True)
    (root / "report" / "k" / "report.html").write_text("<p>report</p>")
    for internal in (".locks", ".prefect"):
        (root / internal).mkdir()
        (root / internal / "x.lock").write_text("internal")
    (root / ".boothflow-ui.json").write_text("{}")
    outside.mkdir()
    (outside / "key.txt").write_text("secret")
    (root / "escape").symlink_to(outside)
    (root / "escape.txt").symlink_to(outside / "key.txt")
    (root / "inside.html").symlink_to(root / "report" / "k" / "report.html")
    server = serve_files(root, free_port())
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/report/k/report.html", 200),
        ("/inside.html", 200),  # a link that stays in the root
        ("/escape/key.txt", 404),
        ("/escape.txt", 404),
        ("/escape/", 404),
        ("/.locks/x.lock", 404),
        ("/.prefect/x.lock", 404),
        ("/%2Elocks/x.lock", 404),
        ("/.boothflow-ui.json", 404),
        ("/../secret/key.txt", 404),
        ("/report/../../secret/key.txt", 404),
    ],
)
def test_only_the_artifact_root_is_served(served: str, path: str, status: int) -> None:
    assert _status(served + path) == status
