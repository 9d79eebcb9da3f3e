"""Cold run vs warm rerun (all cached) vs rerun after adding one image, for the demo flow, measured side by side.

Runs the real `boothflow run` CLI against a running Prefect server and in ephemeral mode, for the demo config and
for the demo with longer training, and writes wall times, per-stage items processed and ratios to RESULTS.md.
Usage: .venv/bin/python benchmarks/rerun.py [--config configs/demo.toml] [--quick] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from results import write_section

from flows.server import api_url, free_port, start_server, stop_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]
BOOTHFLOW = Path(sys.executable).parent / "boothflow"
PROFILES = {
    "demo": [],
    "longer training": ["--set", "train.steps=1000", "--set", "train.checkpoint_every=250"],
}
RUNS = ("cold", "warm", "one new image")
QUICK = {"quick": ["--set", "train.steps=4", "--set", "train.checkpoint_every=0", "--set", "generate.steps=2"]}


def timed_run(command: list, env: dict[str, str], summary: Path) -> tuple[float, dict]:
    started = time.monotonic()
    subprocess.run([*command, "--summary", summary], cwd=REPO, env=env, check=True, capture_output=True)
    return time.monotonic() - started, json.loads(summary.read_text())


def scenario(
    profile: str, settings: list[str], mode: str, config: Path, env: dict[str, str], work: Path, runs: tuple[str, ...]
) -> list[dict]:
    """Cold, warm and one-new-image runs on a fresh artifact root and a fresh copy of the demo images."""
    folder = work / profile.replace(" ", "-") / mode
    images = shutil.copytree(REPO / "data" / "demo", folder / "images")
    command = [BOOTHFLOW, "run", "--config", config, "--artifacts", folder / "artifacts",
               "--set", f"data.instance_dir='{images}'", *settings]  # fmt: skip
    rows = []
    for run in runs:
        if run == "one new image":
            Image.open(images / "toy_01_park.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "new.png")
        seconds, summary = timed_run(command, env, folder / f"{run}.json")
        processed = {stage: s.get("items_processed", 0) for stage, s in summary["stages"].items()}
        rows.append({"profile": profile, "mode": mode, "run": run, "seconds": seconds, "processed": processed,
                     "models_loaded": len(summary.get("models_loaded", []))})  # fmt: skip
        print(f"{profile:16} {mode:10} {run:14} {seconds:7.1f} s  {processed}", flush=True)
    return rows


def write_results(rows: list[dict], profiles_run: dict[str, list[str]], out: Path, command: str) -> None:
    profiles = "; ".join(
        f"{name}: `{' '.join(extra) or 'configs/demo.toml as is'}`" for name, extra in profiles_run.items()
    )
    lines = [
        "# Rerun benchmark",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Profiles: {profiles}.",
        "",
        "| profile | mode | run | wall s | ratio to cold | items processed per stage | models loaded |",
        "| --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    cold = {(r["profile"], r["mode"]): r["seconds"] for r in rows if r["run"] == "cold"}
    for r in rows:
        processed = ", ".join(f"{stage} {n}" for stage, n in r["processed"].items())
        ratio = r["seconds"] / cold[r["profile"], r["mode"]]
        cells = [
            r["profile"],
            r["mode"],
            r["run"],
            f"{r['seconds']:.1f}",
            f"{ratio:.3f}",
            processed,
            r["models_loaded"],
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "Each run is a fresh `boothflow` process, so every row includes Python start-up and the imports of torch",
        "and Prefect; a fully cached run imports no diffusers or transformers. Ephemeral mode also starts a",
        "temporary Prefect server inside every run.",
    ]
    write_section("rerun", lines, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--quick", action="store_true", help="a 4-step demo, cold and warm, temporary server only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    profiles, runs = (QUICK, RUNS[:2]) if args.quick else (PROFILES, RUNS)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_env = {"PREFECT_HOME": str(work / "client-home"), **os.environ}  # the user's, when set
        base_env.pop("PREFECT_API_URL", None)
        if not args.quick:
            port, log = free_port(), work / "server.log"
            server = start_server(port, work / "server-home", log)
            try:
                wait_healthy(server, api_url(port), 120, log)
                env = {**base_env, "PREFECT_API_URL": api_url(port)}
                for profile, settings in profiles.items():
                    rows += scenario(profile, settings, "server", args.config, env, work, runs)
            finally:
                stop_server(server)
        for profile, settings in profiles.items():
            rows += scenario(profile, settings, "ephemeral", args.config, base_env, work, runs)
    write_results(rows, profiles, args.out, " ".join(["python", *sys.argv]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
