"""boothflow installed from its wheel finds what it ships: `boothflow run --config toy` works from an empty folder,
with the preset, the toy-sd weights and the toy images coming from the installed package, not from the repo."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import zipfile
from pathlib import Path

from processes import run

REPO = Path(__file__).resolve().parents[1]

# As short as the toy preset runs: no class images, few steps, two seeds of one prompt, no checkpoints or samples.
SHORT = {
    "model.id": '"toy-sd"',
    "prior.enabled": "false",
    "train.steps": "20",
    "train.batch_size": "1",
    "train.checkpoint_every": "0",
    "train.cpu_threads": "1",  # two torch threads on two busy cores can make it ten times slower
    "train.sample_every": "0",
    "generate.prompts": '["a photo of {token} {class}"]',
    "generate.seeds": "[0, 1]",
    "generate.steps": "2",
    "generate.compare_base": "false",
}


def _files(root: Path) -> set[Path]:
    """Every file under the repo, less git, the venv and tool caches: new files here would be the run's. (Edits are
    not compared: people and tools may change the tree meanwhile; whether the run imports the repo is checked apart.)"""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return {path for path in root.rglob("*") if path.is_file() and not skip & set(path.relative_to(root).parts)}


def _wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the working tree (a build writes build/ and *.egg-info beside its sources)."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    source = tmp_path / "source"
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():  # a file deleted but not yet staged is still listed
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    run(
        [sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(tmp_path.glob("boothflow-*.whl"))


def _venv_with(wheel: Path, folder: Path) -> Path:
    """A fresh venv that sees this venv's packages through a plain .pth line (so not its editable boothflow, whose
    own .pth goes unread) and has the wheel installed; returns its bin folder."""
    run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    purelib = Path(sysconfig.get_path("purelib", "venv", vars={"base": folder, "platbase": folder}))
    (purelib / "project.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", folder / "bin" / "python", "install", "--no-deps", "-q", wheel]
    run(pip, check=True, capture_output=True)
    return folder / "bin"


def test_the_wheel_holds_every_module_and_runs_the_toy_preset_from_an_empty_folder(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    wheel = _wheel(tmp_path / "dist")
    modules = {p.relative_to(REPO).as_posix() for top in ("flows", "tasks") for p in (REPO / top).rglob("*.py")}
    listed = set(zipfile.ZipFile(wheel).namelist())
    assert modules <= listed  # pyproject.toml lists the packages by hand
    sweeps = {f"boothflow_shipped/configs/sweeps/{name}.toml" for name in ("toy", "writeup", "dreambench")}
    sets = {f"boothflow_shipped/{p.relative_to(REPO).as_posix()}" for p in (REPO / "data").rglob("toy_sets/*/*")}
    assert len(sets) == 10 and sweeps | sets <= listed  # the sweep presets and the folders the toy sweep names

    bin_ = _venv_with(wheel, tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"} | {
        "PATH": f"{bin_}{os.pathsep}{cli_env['PATH']}",
        "OMP_NUM_THREADS": "1",  # torch in the flow process, as train.cpu_threads for the training child
    }
    where = "import tasks, tasks.core.shipped as s; print(tasks.__file__); print(s.shipped_root())"
    found = run([bin_ / "python", "-c", where], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    found = found.splitlines()
    assert all(Path(path).is_relative_to(tmp_path / "venv") for path in found), found

    before = _files(REPO)
    settings = [arg for name, value in SHORT.items() for arg in ("--set", f"{name}={value}")]
    summary = work / "summary.json"
    command = [bin_ / "boothflow", "run", "--config", "toy", *settings, "--artifacts", work / "artifacts"]
    proc = run([*command, "--summary", summary], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(summary.read_text())
    statuses = {name: stage["status"] for name, stage in result["stages"].items()}
    assert "report" in statuses and set(statuses.values()) == {"ran"}, statuses
    assert Path(result["outputs"]["report_html"]).is_relative_to(work / "artifacts")
    assert Path(result["outputs"]["report_html"]).is_file()
    assert _files(REPO) - before == set()
