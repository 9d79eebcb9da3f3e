"""The toy DreamBooth figures over several training seeds: configs/toy.toml with and without prior preservation at
train.seed 0 to N-1, on one artifact root (class images and latents are made once), one torch thread per run as the
suite runs it. Each seed is another training trajectory, as a change anywhere upstream (a class image's pixel, a
latent's last bit) makes one; the spread says how far a threshold must sit from the shipped figures. Writes each
seed's figures, their spread and each threshold's margin to RESULTS.md.
Usage: .venv/bin/python benchmarks/toy_figures.py [--seeds 6] [--jobs 2] [--quick] [--out benchmarks/RESULTS.md]
(--quick: two seeds of a two-step training, four class images and two samples per prompt, for the suite; against
PREFECT_API_URL where set, else a server of its own.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import write_section

from flows.server import api_url, free_port, start_server, stop_server, wait_healthy
from tasks.toy.figures import LEAKS_WITHOUT_PRIOR, WITH_PRIOR, WITHOUT_PRIOR, readings

REPO = Path(__file__).resolve().parents[1]
BOOTHFLOW = Path(sys.executable).parent / "boothflow"
QUICK = ["train.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "prior.num_images=4", "prior.steps=2",
         "generate.seeds=2", "generate.steps=2"]  # fmt: skip


def run(seed: int, prior: bool, root: Path, env: dict[str, str], sets: list[str]) -> dict[str, tuple[int, int]]:
    """One `boothflow run` of configs/toy.toml at `seed`: each figure's (hits, images)."""
    summary = root / f"seed-{seed}-{'prior' if prior else 'no-prior'}.json"
    settings = [f"train.seed={seed}", *sets, *(() if prior else WITHOUT_PRIOR)]
    command = [BOOTHFLOW, "run", "-c", "configs/toy.toml", "--artifacts", root,
               *[x for s in settings for x in ("--set", s)], "--summary", summary]  # fmt: skip
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    found = readings(Path(json.loads(summary.read_text())["outputs"]["report_html"]).parent)
    figures = WITH_PRIOR if prior else (LEAKS_WITHOUT_PRIOR,)
    return {figure.name: figure.count(found) for figure in figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="a setting for every run, as boothflow run takes it")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.set = 2, [*QUICK, *args.set]
    work = Path(tempfile.mkdtemp(prefix="toy-figures-"))
    port, log = free_port(), work / "server.log"
    server = None if os.environ.get("PREFECT_API_URL") else start_server(port, work / "server-home", log)
    started = time.monotonic()
    try:
        if server is not None:
            wait_healthy(server, api_url(port), 120, log)
        env = {"PREFECT_API_URL": api_url(port), **os.environ, "PREFECT_LOGGING_LEVEL": "WARNING",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        root = work / "artifacts"
        results = {(0, True): run(0, True, root, env, args.set)}  # class images and latents first, once
        plan = [(seed, prior) for seed in range(args.seeds) for prior in (True, False) if (seed, prior) != (0, True)]
        with ThreadPoolExecutor(args.jobs) as pool:
            for (seed, prior), figures in zip(
                plan, pool.map(lambda p: run(*p, root, env, args.set), plan), strict=True
            ):
                results[seed, prior] = figures
                print(f"seed {seed} {'prior' if prior else 'no prior'}: {figures}", flush=True)
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    write(results, args, time.monotonic() - started)


def write(
    results: dict[tuple[int, bool], dict[str, tuple[int, int]]], args: argparse.Namespace, seconds: float
) -> None:
    lines = [
        "# Toy DreamBooth figures over training seeds",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Command: `python benchmarks/toy_figures.py --seeds "
        f"{args.seeds}` ({time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes). configs/toy.toml as shipped "
        "(train.seed 0 is the suite's run); the last figure is its run without prior preservation.",
        "",
        "| figure | threshold | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean | sd | margin |",
        "| --- | --- | " + " | ".join("---:" for _ in range(args.seeds)) + " | ---: | ---: | ---: |",
    ]
    for figure in (*WITH_PRIOR, LEAKS_WITHOUT_PRIOR):
        prior = figure is not LEAKS_WITHOUT_PRIOR
        counts = [results[seed, prior][figure.name] for seed in range(args.seeds)]
        rates = [100 * hits / images for hits, images in counts]
        bound = ">=" if figure.at_least else "<="
        cells = [figure.name, f"{bound} {100 * figure.threshold:.0f}%", *(f"{r:.1f}%" for r in rates),
                 f"{statistics.mean(rates):.1f}%", f"{statistics.stdev(rates):.1f}",
                 str(min(figure.spare(*c) for c in counts))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Margin: images the worst seed's figure could move the wrong way and still clear its threshold."]
    print("\n".join(lines))
    if args.out:
        write_section("toy_figures", lines, args.out)


if __name__ == "__main__":
    main()
