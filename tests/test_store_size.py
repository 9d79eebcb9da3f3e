"""The big-store benchmark never rots: its quick mode pads the demo's train entry by 4 MiB, reruns warm over both
stores against the suite's Prefect server, and `cache verify` must name the byte it flipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "store_size.py"


def test_quick_mode_reruns_warm_over_both_stores_and_verify_names_the_flip(cli_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", out], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "| demo's |" in text and "| train entry padded |" in text
    assert "a plain lookup also refuses the entry" in text
    assert "exits 1" in text and "padding.bin: bytes differ from the manifest's sha256`." in text
