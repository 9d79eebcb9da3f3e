"""Runs a benchmark's quick mode into a private RESULTS.md and reads a row of the table it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_results(script: str, folder: Path) -> str:
    """`benchmarks/<script> --quick --out <folder>/RESULTS.md`, which must succeed; the file's text."""
    out = folder / "RESULTS.md"
    proc = subprocess.run([sys.executable, REPO / "benchmarks" / script, "--quick", "--out", out], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]
