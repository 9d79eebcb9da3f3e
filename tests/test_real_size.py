"""The real-size benchmark never rots: its quick mode runs both families' path (train stage, export reload or LoRA
fuse, a one-image generate, the memory plan beside each peak) on the tiny presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from benchmark_quick import run_quick

from tasks.sd.layout import LORA_FILE
from tasks.sd.models import resolve

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
    # Disk per subject: the export links the base's VAE and the trained weights, so sd15 saves the VAE less the
    # export's own records (under 16 KiB); the LoRA's files are linked from the train entry, so sdxl's after is its
    # before plus those records.
    root = tmp_path / "artifacts"
    vae = sum(f.stat().st_size for f in resolve("tiny-sd15", "", root).vae_path.glob("*.safetensors"))
    sd15, sdxl = rows["sd15-arch"], rows["sdxl-arch"]
    assert vae - 16 * 1024 < sd15["disk_before"] - sd15["disk_after"] <= vae, sd15
    lora = next((root / "export").glob(f"*/model/{LORA_FILE}")).stat().st_size
    assert 0 <= sdxl["disk_after"] - sdxl["disk_before"] < lora, sdxl
    # Without the single file, a float32 export is links and configs: the subject costs its trained weights.
    weights = sum(
        f.stat().st_size for f in next((root / "train").glob("*/weights/unet")).parent.rglob("*") if f.is_file()
    )
    assert weights <= sd15["disk_variants"]["no single file"] < weights + 64 * 1024 < sd15["disk_after"], sd15
    assert sorted(sd15["disk_variants"]) == ["float16", "float16, no single file", "no single file"]
