"""The checkpoint stall benchmark never rots: its quick mode runs the trainer's own checkpoint writer on a few MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "checkpoint_stall.py"


def test_quick_mode_measures_the_block_beside_the_write(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--dir", tmp_path], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[0])
    assert 0 < result["state_gib"] < 0.01 and result["write_s"] > 0 and result["steps_beside"] >= 2
    assert result["blocked_s"] > 0 and result["first_blocked_s"] > 0 and result["repeats"] == 1
    assert "GiB of state on CPU" in proc.stdout.splitlines()[1]
    assert list(tmp_path.iterdir()) == []  # its checkpoints go with it
