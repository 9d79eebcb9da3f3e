"""Nights nobody watches: a full disk fails one stage in one line, and the rerun reuses every finished entry."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.store import Store

QUICK = ["-c", "configs/demo.toml", "--set", "train.steps=4", "--set", "train.checkpoint_every=0",
         "--set", "train.sample_every=0", "--set", "generate.steps=2"]  # fmt: skip


def test_a_full_disk_fails_the_stage_in_one_line_and_the_rerun_reuses_what_finished(boothflow, tmp_path: Path):
    root = tmp_path / "a"
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"disk_full": "train"}))
    failed = boothflow("run", *QUICK, "--artifacts", root, "--summary", tmp_path / "1.json", check=False,
                       env={"BOOTHFLOW_FAULTS": str(faults)})  # fmt: skip
    assert failed.returncode == 1
    summary = json.loads((tmp_path / "1.json").read_text())
    error = summary["error"]
    assert error["stage"] == "train" and error["item"].startswith("train/"), error
    assert error["message"].startswith(f"no space left on the disk of the artifact root {root}: writing train/")
    assert "needed more than" in error["message"] and "GiB free now" in error["message"]
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("failed (train, train/") and ": no space left on the disk" in last_line, last_line
    store = Store(root)
    assert store.verify().damaged == [] and not any(e["state"] == "partial" for e in store.entries())
    assert [e["state"] for e in store.entries() if e["stage"] == "train"] == ["incomplete"]  # resume checkpoints

    faults.unlink()
    boothflow("run", *QUICK, "--artifacts", root, "--summary", tmp_path / "2.json")
    stages = json.loads((tmp_path / "2.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("preprocess", "latents", "train")] == ["cached", "cached", "ran"]
    assert stages["preprocess"]["key"] == summary["stages"]["preprocess"]["key"]
