"""The checkpoint stall benchmark never rots: its quick mode runs the trainer's own checkpoint writer on a few MB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_quick import run_quick


def test_quick_mode_measures_the_block_beside_the_write(tmp_path: Path) -> None:
    lines = run_quick("checkpoint_stall.py", "--dir", tmp_path).splitlines()
    result = json.loads(lines[0])
    assert 0 < result["state_gib"] < 0.01 and result["write_s"] > 0
    # The state written is the quick model's float32 weights and both AdamW moments (4 layers of 256 x 256 + 256; the
    # step counters are bytes), and the timed write finished whole: keep_checkpoints=1 leaves only the third
    # checkpoint (the write alone, the writer's first, then the one repetition).
    assert result["state_gib"] == pytest.approx(3 * 4 * 4 * (256 * 256 + 256) / 2**30, rel=1e-3)
    assert result["kept"] == ["step-000003"]
    assert result["blocked_s"] > 0 and result["first_blocked_s"] > 0
    assert "GiB of state on CPU" in lines[1]
    assert list(tmp_path.iterdir()) == []  # its checkpoints go with it
