"""A night of many subjects: N toy subjects trained by one `boothflow worker`, three nights side by side: cold, one
photo of one subject changed, nothing changed. Wall time per night, training and rendering seconds, and the overhead
per subject (wall minus model time, over N), against the goals: an unchanged night at most 5 s per subject, the
one-change night at most cold/N + 5 s x (N - 1) + 30 s.

Usage: .venv/bin/python benchmarks/subjects.py [--subjects 6] [--quick] [--out benchmarks/RESULTS.md]
--quick: 2 subjects, 4 training steps, run here (no worker) against PREFECT_API_URL's server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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
POOL = "subjects-benchmark"
NIGHTS = ("cold", "one photo changed", "nothing changed")
# The photos are written just before each night: none of them is still arriving (data.settle_minutes).
SETTINGS = ["train.steps=100", "train.checkpoint_every=0", "train.sample_every=0", "train.pick=last",
            "generate.seeds=[0,1,2,3]", "generate.validation_prompts=[]", "data.settle_minutes=0"]  # fmt: skip
QUICK = ["prior.enabled=false", "train.steps=4", "train.checkpoint_every=0", "train.sample_every=0",
         "train.pick=last", "generate.seeds=[0]", "generate.steps=2", "generate.compare_base=false",
         "generate.validation_prompts=[]", "data.settle_minutes=0"]  # fmt: skip
MODEL_STAGES = {"train": "training", "class_images": "rendering", "generate": "rendering"}
STOP_WAIT = 60  # seconds the worker has to stop after Ctrl-C


def night(folder: Path, root: Path, settings: list[str], pool: str, env: dict[str, str], record: Path) -> dict:
    """One `boothflow subjects` night: its wall seconds, and per subject what each stage did and took."""
    command = [BOOTHFLOW, "subjects", folder, "--config", "toy", "--artifacts", root, "--summary", record,
               *(["--pool", pool] if pool else []), *(x for s in settings for x in ("--set", s))]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the night failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(record.read_text())
    rows = result["subjects"]
    model = {"training": 0.0, "rendering": 0.0}
    for run_id in result["flow_runs"].values():
        stages = json.loads((root / "runs" / run_id / "summary.json").read_text())["stages"]
        for stage, done in stages.items():
            if stage in MODEL_STAGES and done.get("status") == "ran":
                model[MODEL_STAGES[stage]] += done["seconds"]
    trained = sorted(row["subject"] for row in rows if any(s["stage"] == "train" and s["status"] == "ran"
                                                           for s in row["stages"]))  # fmt: skip
    return {"seconds": seconds, **model, "trained": trained, "states": sorted({row["state"] for row in rows})}


def measure(count: int, settings: list[str], pool: str, env: dict[str, str], work: Path) -> list[dict]:
    sys.path.insert(0, str(REPO / "data"))
    from make_toy import write_subjects

    folders = write_subjects(work / "subjects", count)
    rows = []
    for name in NIGHTS:
        if name == "one photo changed":
            photo = next(folders[0].glob("*.png"))
            Image.open(photo).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(photo)
        result = night(work / "subjects", work / "artifacts", settings, pool, env, work / f"{name}.json")
        rows.append({"night": name, **result})
        print(f"{name:18} {result['seconds']:7.1f} s  trained {result['trained']}", flush=True)
    return rows


def wait_for_worker(api: str, timeout: float = 120) -> None:
    """Until the worker has created the pool and is online, so the first night does not find the pool missing."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                if client.read_workers_for_work_pool(POOL):
                    return
            except Exception:  # the pool does not exist yet
                pass
            time.sleep(1)
    raise SystemExit(f"no worker of pool {POOL} came online in {timeout:.0f} s")


def write_results(rows: list[dict], count: int, mode: str, out: Path, command: str) -> None:
    cold = rows[0]["seconds"]
    goals = {"one photo changed": cold / count + 5 * (count - 1) + 30, "nothing changed": 5 * count}
    lines = [
        "# Subjects night",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}); {count} toy subjects ({mode}).",
        "",
        "| night | wall s | training s | rendering s | overhead per subject s | subjects trained | goal | met |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for row in rows:
        overhead = (row["seconds"] - row["training"] - row["rendering"]) / count
        goal = goals.get(row["night"])
        verdict = (f"<= {goal:.1f} s", "yes" if row["seconds"] <= goal else "no") if goal else ("", "")
        cells = [row["night"], f"{row['seconds']:.1f}", f"{row['training']:.1f}", f"{row['rendering']:.1f}",
                 f"{overhead:.1f}", ", ".join(row["trained"]) or "none", *verdict]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each night is one `boothflow subjects` process (start-up and imports included); model time is the train,",
        "class_images and generate stages that ran. The goals: one changed photo costs one subject's cold share plus",
        "5 s for each unchanged subject and 30 s; an unchanged night costs at most 5 s per subject.",
    ]
    write_section("subjects", lines, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 subjects, 4 steps, here against PREFECT_API_URL")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    command = " ".join(["benchmarks/subjects.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            rows = measure(2, QUICK, "", dict(os.environ), work)
            write_results(rows, 2, "quick: here, no worker", args.out, command)
            return
        port, log = free_port(), work / "server.log"
        server = start_server(port, work / "server-home", log)
        worker = None
        try:
            wait_healthy(server, api_url(port), 120, log)
            env = {**os.environ, "PREFECT_API_URL": api_url(port), "PREFECT_HOME": str(work / "client-home"),
                   "PREFECT_WORKER_QUERY_SECONDS": "1"}  # fmt: skip
            worker = subprocess.Popen([BOOTHFLOW, "worker", "--pool", POOL], cwd=REPO, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            wait_for_worker(api_url(port))
            rows = measure(args.subjects, SETTINGS, POOL, env, work)
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGINT)
                try:
                    worker.wait(STOP_WAIT)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
            stop_server(server)
    write_results(rows, args.subjects, "one `boothflow worker`, a local Prefect server", args.out, command)


if __name__ == "__main__":
    main()
