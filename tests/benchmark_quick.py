"""Runs a benchmark's quick mode as `python benchmarks/<script> --quick ...` would, but in the suite's process: that one
has imported torch and diffusers already, which is most of a quick mode's time in a fresh interpreter."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_quick(script: str, *args: object, env: dict[str, str] | None = None) -> str:
    """`benchmarks/<script> --quick ARGS` as __main__, from the repository root, with `env` as the environment if
    given; it must exit 0. Its stdout; sys.argv, sys.path, the environment and torch's threads are put back after."""
    saved = sys.argv, list(sys.path), dict(os.environ), torch.get_num_threads()
    sys.argv, sys.path[:0] = [str(BENCHMARKS / script), "--quick", *map(str, args)], [str(BENCHMARKS)]
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    out = io.StringIO()
    try:
        with contextlib.chdir(REPO), contextlib.redirect_stdout(out):
            runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (None, 0), f"{script} exited {exit.code}:\n{out.getvalue()[-3000:]}"
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
    return out.getvalue()


def quick_results(script: str, folder: Path, env: dict[str, str] | None = None) -> str:
    """`run_quick(script, "--out", <folder>/RESULTS.md)`; the text it wrote there."""
    out = folder / "RESULTS.md"
    run_quick(script, "--out", out, env=env)
    return out.read_text()


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]
