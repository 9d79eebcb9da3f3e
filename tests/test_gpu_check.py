"""The GPU check never rots: its smoke mode runs here on CPU (tiny presets) through the real training step and
renderer, without Prefect, and it names what a bare CUDA machine still has to install."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from benchmark_quick import table_row
from processes import run

pytestmark = pytest.mark.training

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_smoke_mode_measures_every_case_beside_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run([sys.executable, SCRIPT, "--smoke", "--out", out], cwd=REPO, capture_output=True, text=True,
               timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert list(rows) == [
        "sd15 fp32",
        "sdxl fp32",
        "tiny-sd15 generate batch 1",
        "tiny-sd15 generate batch 2",
        "tiny-sdxl generate batch 1",
        "tiny-sdxl generate batch 2",
        "tiny-sd15 checkpoint while training",
    ]
    for row in rows.values():
        assert row["rate"] > 0 and row["peak_mib"] > 100 and row["plan_mib"] > 0, row
        assert row["prefect_imported"] is False
    assert rows["sd15 fp32"]["finite"] and rows["sdxl fp32"]["finite"]
    assert set(rows["sd15 fp32"]["ms"]) == {"floor", "cached", "reference"} and set(rows["sdxl fp32"]["ms"]) == {
        "floor",
        "cached",
    }
    assert min(rows["sd15 fp32"]["ms"].values()) > 0 and rows["sd15 fp32"]["first_step_s"] > 0
    assert (rows["sd15 fp32"]["unit"], rows["tiny-sd15 generate batch 2"]["unit"]) == ("steps/s", "images/s")
    # Each rendering case rendered its whole batch: its images/s counts the images asked for.
    renders = [f"tiny-{family} generate batch {batch}" for family in ("sd15", "sdxl") for batch in (1, 2)]
    assert [rows[case]["images"] for case in renders] == [1, 2, 1, 2]
    # results.md holds results.json's figures, each in its own column; sdxl fp32 times no reference (c).
    table = (out / "results.md").read_text()
    sd15, sdxl = rows["sd15 fp32"], rows["sdxl fp32"]
    cells = table_row(table, "sd15 fp32")
    assert cells[1:4] == [f"{sd15['rate']:.3f} steps/s", f"{sd15['peak_mib']:.0f}", f"{sd15['plan_mib']:.0f}"]
    assert cells[5:8] == [f"{sd15['ms'][mode]:.1f}" for mode in ("floor", "cached", "reference")]
    assert table_row(table, "sdxl fp32")[5:8] == [f"{sdxl['ms']['floor']:.1f}", f"{sdxl['ms']['cached']:.1f}", ""]
    # On a CPU the writer writes in place (as training does there): nothing pinned, and the save restores exactly.
    checkpoint = rows["tiny-sd15 checkpoint while training"]
    assert (checkpoint["background"], checkpoint["pinned"], checkpoint["restored"]) == (False, False, True)
    assert checkpoint["write_s"] * 1e3 >= checkpoint["stall_ms"] > 0


def test_a_bare_machine_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    present = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util, "find_spec", lambda name: None if name in ("diffusers", "yaml") else present(name)
    )
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    assert gpu_check.missing_packages() == [f"diffusers=={pins['diffusers']}", f"pyyaml=={pins['PyYAML']}"]


def test_a_spent_budget_lists_the_cases_it_did_not_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run([sys.executable, SCRIPT, "--smoke", "--out", out, "--budget", "0", "--only", "sdxl fp32",
                "--only", "tiny-sd15 generate batch 2"], cwd=REPO, capture_output=True, text=True,
               timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["case"], row["skipped"]) for row in rows] == [
        ("sdxl fp32", "not run: the 0 s budget was spent"),
        ("tiny-sd15 generate batch 2", "not run: the 0 s budget was spent"),
    ]
