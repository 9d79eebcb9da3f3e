"""The training-throughput benchmark never rots: its quick mode runs all four measurements on tiny-sd15."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def test_quick_mode_measures_floor_cached_reference_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", out], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| tiny-sd15 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    floor, cached, reference, cli, *ratios, gflop = map(float, cells[3:])
    assert min(floor, cached, reference, cli) > 0
    assert abs(ratios[0] - cached / floor) < 0.01 and ratios[2] > 1  # the VAE encode adds FLOPs
    assert gflop > 0 and "<!-- begin train_throughput -->" in text
