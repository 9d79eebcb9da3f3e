"""The real-size benchmark never rots: its quick mode runs both families' path (train stage, export reload or LoRA
fuse, a one-image generate, the memory plan beside each peak) on the tiny presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from benchmark_quick import run_quick

pytestmark = pytest.mark.training


def test_quick_mode_trains_reloads_and_plans_both_families(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run_quick("real_size.py", "--artifacts", tmp_path / "artifacts", "--out", out)
    rows = json.loads((tmp_path / "real_size.json").read_text())
    assert sorted(rows) == ["sd15-arch", "sdxl-arch"]
    for row in rows.values():
        assert len(row["steps"]) == 2 and row["train_peak"] > 100 and row["plan_train"] > 0, row
    assert (
        "from_single_file == diffusers folder: {'unet': True, 'vae': True, 'text_encoder': True}"
        in (rows["sd15-arch"]["verdict"])
    )
    assert "largest difference from base + B @ A 0.00e+00" in rows["sdxl-arch"]["verdict"]
    # That match means something only if B @ A is not zero: the two steps moved the adapters off B's zero start.
    assert float(re.search(r"largest trained change (\S+),", rows["sdxl-arch"]["verdict"])[1]) > 0
    assert "| sd15-arch |" in out.read_text()
