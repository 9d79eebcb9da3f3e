"""Nights nobody watches: boothflow SIGKILLed at named points in every stage, and a full disk, between reruns of one
artifact root; the last rerun ends with exactly the outputs of an uninterrupted run, nothing partial, no lock held."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import pandas as pd
from filelock import FileLock
from prefect_api import run_logs

from flows.runner import ExpectedFailures
from tasks.core.manifest import MANIFEST
from tasks.core.stage import StageError
from tasks.core.store import Store

CONFIG = ["-c", "configs/demo.toml", "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
          "--set", "train.sample_every=0", "--set", "generate.steps=2", "--set", "prior.enabled=true",
          "--set", "prior.num_images=2", "--set", "prior.steps=2"]  # fmt: skip

# One rerun after another on the same root, each stopped later in the pipeline than the one before.
INTERRUPTIONS = [
    {"kill_at": "preprocess-items:after-3"},  # mid-stage, after its third image
    {"kill_at": "preprocess:before-rename"},  # the stage entry whole, manifest written, not yet in place
    {"kill_at": "class_images-items:after-1"},  # mid-batch: the rerun renders that batch whole again
    {"kill_at": "latents:before-manifest"},
    {"kill_at": "train:mid-checkpoint-2"},  # the training child and the flow, while step 2's checkpoint is written
    {"kill_at": "train:mid-export"},  # after the weights are written, before the card; resumes from step 2
    {"kill_at": "generate-items:after-3"},
    {"disk_full": "generate"},
    {"kill_at": "evaluate:before-manifest"},
    {"kill_at": "report:before-rename"},
]


# What records this run's own clock and memory rather than its outputs (compared apart, or not at all).
RUN_RECORDS = {("train", "metrics.csv"), ("train", "memory.json"), ("report", "report.html")}


def _files(root: Path, stage: str, key: str) -> dict[str, str]:
    manifest = json.loads((root / stage / key / MANIFEST).read_text())
    return {name: m["sha256"] for name, m in manifest["files"].items() if (stage, name) not in RUN_RECORDS}


def _losses(root: Path, key: str) -> list[tuple[int, float]]:
    table = pd.read_csv(root / "train" / key / "metrics.csv")
    return list(zip(table["step"], table["loss"], strict=True))


def test_killed_anywhere_or_out_of_disk_the_rerun_ends_as_an_uninterrupted_run(
    boothflow, prefect_server: str, tmp_path: Path
) -> None:
    reference, root = tmp_path / "reference", tmp_path / "interrupted"
    boothflow("run", *CONFIG, "--artifacts", reference, "--summary", tmp_path / "reference.json")
    expected = json.loads((tmp_path / "reference.json").read_text())["stages"]

    faults = tmp_path / "faults.json"
    for number, fault in enumerate(INTERRUPTIONS):
        faults.write_text(json.dumps(fault))
        summary = tmp_path / f"{number}.json"
        proc = boothflow("run", *CONFIG, "--artifacts", root, "--summary", summary, check=False,
                         env={"BOOTHFLOW_FAULTS": str(faults)})  # fmt: skip
        if "kill_at" in fault:
            assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
            continue
        assert proc.returncode == 1, proc.stderr[-3000:]  # a full disk: the stage fails in one line
        error = json.loads(summary.read_text())["error"]
        assert (error["stage"], error["item"]) == ("generate", f"generate/{expected['generate']['key']}")
        assert error["message"].startswith(f"no space left on the disk of the artifact root {root}: writing generate/")
        assert "needed more than" in error["message"] and "GiB free now" in error["message"]
        last_line = proc.stderr.strip().splitlines()[-1]
        assert last_line.startswith("failed (generate, generate/") and ": no space left on the disk" in last_line
        logs = run_logs(prefect_server, json.loads(summary.read_text())["run"]["flow_run_id"])
        assert any("no space left on the disk" in line for line in logs), logs
        assert not any("Traceback" in text for text in [proc.stdout, proc.stderr, *logs])  # one line, no traceback
        assert Store(root).verify().damaged == []  # the store stays valid
    faults.unlink()
    boothflow("run", *CONFIG, "--artifacts", root, "--summary", tmp_path / "final.json")

    final = json.loads((tmp_path / "final.json").read_text())
    assert final["error"] is None
    assert {s: v["key"] for s, v in final["stages"].items()} == {s: v["key"] for s, v in expected.items()}
    assert [s for s, v in final["stages"].items() if v["status"] != "cached"] == ["report"]  # the rest came before
    for stage, entry in expected.items():  # every image, tensor, weight, table and card, byte for byte
        assert _files(root, stage, entry["key"]) == _files(reference, stage, entry["key"]), stage
    train_key = expected["train"]["key"]
    assert _losses(root, train_key) == _losses(reference, train_key)  # resumed at step 2, every loss the same
    store = Store(root)
    assert [e for e in store.entries() if e["state"] != "complete"] == []  # no partial folder, no checkpoints
    for lock in (root / ".locks").rglob("*.lock"):
        FileLock(lock).acquire(timeout=0)  # none is left held


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())


def test_an_expected_failure_loses_its_traceback_and_any_other_keeps_it() -> None:
    expected, unexpected = _record(StageError("train", "loss is nan", "step 4")), _record(ValueError("bug"))
    assert ExpectedFailures().filter(expected) and ExpectedFailures().filter(unexpected)
    assert expected.exc_info is None and unexpected.exc_info is not None
    assert "Traceback" in logging.Formatter().format(unexpected)
