"""The checkpoint stall benchmark never rots: its quick mode runs the trainer's own checkpoint writer on a few MB."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_quick import run_quick


def test_quick_mode_measures_the_block_beside_the_write(tmp_path: Path) -> None:
    lines = run_quick("checkpoint_stall.py", "--dir", tmp_path).splitlines()
    result = json.loads(lines[0])
    assert 0 < result["state_gib"] < 0.01 and result["write_s"] > 0 and result["steps_beside"] >= 2
    assert result["blocked_s"] > 0 and result["first_blocked_s"] > 0 and result["repeats"] == 1
    assert "GiB of state on CPU" in lines[1]
    assert list(tmp_path.iterdir()) == []  # its checkpoints go with it
