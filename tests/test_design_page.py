"""DESIGN.md is the page a newcomer reads first: linked from the README and pyproject.toml, and every path it
names exists, so a move or a rename that forgets it fails here."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATH = re.compile(r"`((?:flows|tasks|tests|benchmarks|configs|data)/[\w./-]*)`")


def test_every_path_the_design_page_names_exists() -> None:
    page = (REPO / "DESIGN.md").read_text()
    named = set(PATH.findall(page))
    assert len(named) >= 20, named  # the page names the modules it explains
    assert [path for path in sorted(named) if not (REPO / path).exists()] == []


def test_the_readme_and_pyproject_point_at_the_design_page() -> None:
    assert "[DESIGN.md](DESIGN.md)" in (REPO / "README.md").read_text()
    assert "DESIGN.md" in (REPO / "pyproject.toml").read_text()
