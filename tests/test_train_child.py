"""The training child never outlives the stage process that launched it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from processes import run, started

pytestmark = pytest.mark.training

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from pathlib import Path
from tasks.stages import latents, preprocess, train
from tasks.core.config import LatentsSection, PreprocessSection, TrainSection
from tasks.sd.models import resolve
from tasks.core.store import Store

root, images = Path(sys.argv[1]), Path(sys.argv[2])
store = Store(root)
model = resolve("tiny-sd15", "", root)
inputs = preprocess.PreprocessInputs(images, preprocess.scan(images), 1)
pre = preprocess.run(PreprocessSection(resolution=64), inputs, store)
lat = latents.run(LatentsSection(), latents.LatentsInputs(model, pre, None), store)
cfg = TrainSection(steps=100000, checkpoint_every=0, train_text_encoder=False)
train.run(cfg, train.TrainInputs(model, lat, "a photo of sks toy", None, 0.0), store)
"""


def _trainers() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tasks.training" in cmdline and b"-m" in cmdline and b"accelerate.commands.launch" not in cmdline:
            found.append(int(pid))
    return found


def test_the_training_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    before = set(_trainers())
    with started([sys.executable, "-c", SCRIPT, tmp_path / "a", REPO / "data" / "demo"], log=tmp_path / "log",
                 cwd=REPO) as parent:  # fmt: skip
        deadline = time.monotonic() + 120
        while not (children := set(_trainers()) - before):
            assert time.monotonic() < deadline and parent.poll() is None, "the training child never started"
            time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)  # the parent alone: the kernel must end its child
        parent.wait()
        deadline = time.monotonic() + 15
        while children & set(_trainers()):
            assert time.monotonic() < deadline, "the training child outlived its parent"
            time.sleep(0.5)


def test_the_training_child_imports_no_prefect() -> None:
    """It runs under accelerate on GPU nodes; Prefect (and its start-up and logging) stays in the stage process."""
    check = "import sys, tasks.training.loop; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    proc = run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
