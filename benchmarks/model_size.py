"""A warm rerun whose base model is a local folder 14 GiB bigger costs what one with the plain folder costs (each model
file is hashed once per artifact root, then known by its stat), and a byte changed in place in that model is found by
the next run and changes the keys of the stages that depend on it.

Copies the shipped toy-sd twice, one copy with `unet/padding.bin` of random bytes (written in full, not sparse); each
copy is the `model.id` of `configs/demo.toml` with its own artifact root. Both run cold once; then warm `boothflow run`s
over the two are timed in turns, each with the bytes its process read (`rchar` of /proc/<pid>/io: every read() call).
Then one byte in the middle of the padding is changed (size kept, mtime put back) and the next run must read the file
again, remember its new digest and change the keys of the stages after the model, and only those. Linux only (/proc).
Reports to $PREFECT_API_URL when set, else to a private server.
Usage: .venv/bin/python benchmarks/model_size.py [--pad-gib 14] [--repeats 5] [--out benchmarks/RESULTS.md]
`--quick`: 64 MiB of padding in `vae/` instead, `boothflow stage latents` (no training), one warm run each (the suite
runs it so the script never rots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rerun import BOOTHFLOW, REPO
from results import RESULTS, write_section
from store_size import CHUNK, flip_byte_keeping_mtime, prefect_env

from tasks.core.hash_memo import MEMO_FILE, RACY_WINDOW_NS
from tasks.core.manifest import file_sha256, file_stat
from tasks.sd.presets import SHIPPED_FOLDER

MODELS = {"plain": "toy-sd", "padded": "toy-sd + padding"}


def padding(quick: bool) -> Path:
    """Where the padding goes: the UNet (train's model); quick, the VAE, so the stage that reads it trains nothing."""
    return Path("vae" if quick else "unet") / "padding.bin"


def first_reader(quick: bool) -> str:
    """The first stage whose key holds the padded component's identity."""
    return "latents" if quick else "train"


def copy_model(folder: Path, pad_bytes: int, pad: Path) -> Path:
    """The shipped toy-sd copied into `folder`, with `pad_bytes` of random bytes in `pad` when not 0: a file diffusers
    never loads, which the model's identity covers like any other."""
    shutil.copytree(SHIPPED_FOLDER / "toy-sd", folder)
    if pad_bytes:
        with (folder / pad).open("wb") as f:
            for left in range(pad_bytes, 0, -CHUNK):
                f.write(os.urandom(min(CHUNK, left)))
    return folder


def run_command(model: Path, root: Path, stage: str | None) -> list:
    """`boothflow run` of the demo with `model` as its base model, or `boothflow stage STAGE`."""
    command = ["stage", stage] if stage else ["run"]
    return [BOOTHFLOW, *command, "--config", "configs/demo.toml", "--artifacts", root, "--set", f"model.id='{model}'"]


def measured_run(command: list, env: dict[str, str], summary: Path) -> tuple[float, int, dict]:
    """Wall time, bytes read by the process (read from /proc after it exited and before it is reaped, so every
    thread's reads are in) and its summary."""
    log = summary.with_suffix(".log")
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen([*command, "--summary", summary], cwd=REPO, env=env, stdout=output, stderr=output)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    took = time.monotonic() - started
    io = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} exited {process.returncode}:\n{log.read_text()[-3000:]}")
    return took, int(io["rchar"]), json.loads(summary.read_text())


def remembered(root: Path, file: Path) -> tuple[list[int], str]:
    """The stat and sha256 the artifact root's hash memo holds for `file`."""
    with sqlite3.connect(root / MEMO_FILE) as db:
        stat, sha256 = db.execute("SELECT stat, sha256 FROM files WHERE path = ?", (os.fsencode(file),)).fetchone()
    return json.loads(stat), sha256


def keys(summary: dict) -> dict[str, str]:
    return {stage: s["key"] for stage, s in summary["stages"].items() if s.get("key")}


def measure(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict:
    """Cold runs over both copies, warm runs in turns (so a change of load hits both), then the changed byte."""
    pad_bytes, pad = int(args.pad_gib * 2**30), padding(args.quick)
    models = {name: copy_model(work / name / "model", pad_bytes if name == "padded" else 0, pad) for name in MODELS}
    time.sleep(RACY_WINDOW_NS / 1e9)  # past the racy window, as a model is a few seconds after it was written
    stage = "latents" if args.quick else None
    runs = {name: run_command(model, work / name / "artifacts", stage) for name, model in models.items()}
    f: dict = {
        "pad_bytes": pad_bytes,
        "pad": pad.as_posix(),
        "reader": first_reader(args.quick),
        "load_before": os.getloadavg(),
        "cold": {},
        "warm": {},
        "read": {},
    }
    last: dict[str, dict] = {}  # each model's last warm summary
    f["sizes"] = {name: sum(p.stat().st_size for p in m.rglob("*") if p.is_file()) for name, m in models.items()}
    for name, command in runs.items():
        if args.quick:  # what `stage latents` reads comes from the cache
            measured_run(run_command(models[name], work / name / "artifacts", "preprocess"), env, work / "pre.json")
        f["cold"][name] = measured_run(command, env, work / f"{name}-cold.json")[0]
        f["warm"][name], f["read"][name] = [], []
        print(f"cold run, {MODELS[name]}: {f['cold'][name]:.1f} s", flush=True)
    for n in range(args.repeats):
        for name, command in runs.items():
            took, read, last[name] = measured_run(command, env, work / f"{name}-{n}.json")
            assert all(s["status"] == "cached" for s in last[name]["stages"].values() if s["status"] != "skipped")
            f["warm"][name].append(took)
            f["read"][name].append(read)
            print(f"warm run, {MODELS[name]}: {took:.2f} s, {read:,} bytes read", flush=True)
    f["load_after"] = os.getloadavg()

    padded, root = models["padded"] / pad, work / "padded" / "artifacts"
    f["keys_before"] = keys(last["padded"])
    f["stat_before"], f["sha_before"] = remembered(root, padded)
    f["changed_at"] = pad_bytes // 2
    flip_byte_keeping_mtime(padded, f["changed_at"])
    f["stat_now"] = file_stat(padded)
    f["changed_s"], f["changed_read"], after = measured_run(runs["padded"], env, work / "changed.json")
    f["keys_after"] = keys(after)
    f["stat_after"], f["sha_after"] = remembered(root, padded)
    f["memo_bytes"] = (root / MEMO_FILE).stat().st_size
    started = time.monotonic()
    f["sha_now"] = file_sha256(padded)  # what the run must have remembered; and what each run paid before the memo
    f["hash_s"] = time.monotonic() - started
    print(f"after the changed byte: {f['changed_s']:.1f} s, {f['changed_read']:,} bytes read", flush=True)
    return f


def checks(f: dict) -> dict[str, bool]:
    """What must hold whatever the machine's speed: counts of bytes read, digests and keys, never seconds."""
    before, after = f["keys_before"], f["keys_after"]
    return {
        "no warm run read the padding": max(f["read"]["padded"]) - min(f["read"]["plain"]) < f["pad_bytes"] / 2,
        "the changed file's stat moved": f["stat_now"] != f["stat_before"],
        "the next run remembered its new digest": f["stat_after"] == f["stat_now"]
        and f["sha_before"] != f["sha_after"] == f["sha_now"],
        f"{f['reader']}'s key changed": after[f["reader"]] != before[f["reader"]],
        "preprocess's did not": after["preprocess"] == before["preprocess"],
    }


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def write_results(f: dict, out: Path, command: str) -> None:
    med = {name: statistics.median(f["warm"][name]) for name in MODELS}
    pairs = [p - d for d, p in zip(f["warm"]["plain"], f["warm"]["padded"], strict=True)]
    gaps = {
        "the difference of the medians": med["padded"] - med["plain"],
        "the paired median": statistics.median(pairs),
    }
    held = [name for name, gap in gaps.items() if gap <= 1.0]
    verdict = f"it holds by {' and by '.join(held)}" if held else "it does not hold"
    read = {name: statistics.median(f["read"][name]) for name in MODELS}
    load = f"{_seconds(f['load_before'])} before the runs, {_seconds(f['load_after'])} after the warm ones"
    rows = [
        f"| {label} | {f['sizes'][name]:,} B | {f['cold'][name]:.1f} | {med[name]:.2f} | {_seconds(f['warm'][name])} | "
        f"{read[name]:,.0f} |"
        for name, label in MODELS.items()
    ]
    before, after = f["keys_before"], f["keys_after"]
    changed = [stage for stage in after if after[stage] != before.get(stage)]
    kept = [stage for stage in after if after[stage] == before.get(stage)]
    key_rows = [f"| {stage} | `{before.get(stage, '')}` | `{after[stage]}` |" for stage in after]
    held_checks = checks(f)
    pad, stat = f"`{f['pad']}`", "(size, mtime_ns, ctime_ns, inode)"
    lines = [
        "# Warm rerun with a big local base model, and a byte changed in it",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average (1, 5, 15 min) {load}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).",
        f"Two copies of the shipped `toy-sd` folder, one with {f['pad_bytes']:,} random bytes (written in full, not",
        f"sparse) in {pad}, each the `model.id` of `configs/demo.toml` with its own artifact root. Each runs cold",
        f"once, which hashes every model file and remembers its digest in `<artifacts>/{MEMO_FILE.as_posix()}`. Warm",
        "runs: fresh `boothflow run` processes against a running Prefect server, over the two in turns; medians of",
        f"{len(f['warm']['plain'])}. Bytes read: `rchar` of the run's process (/proc/<pid>/io), all it read():",
        "Python's own files, the store's manifests, the memo...",
        "",
        "| base model | model folder | cold run (s) | warm run (median s) | each warm run (s) | bytes read (median) |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        *rows,
        "",
        f"Difference of the medians: {gaps['the difference of the medians']:+.2f} s. Paired differences (each padded",
        f"run minus the plain run just before it): {_seconds(pairs)}; median {gaps['the paired median']:+.2f} s.",
        f"The goal allows +1 s: {verdict}.",
        f"Bytes read, padded minus plain (medians): {read['padded'] - read['plain']:+,.0f}.",
        "",
        f"Then byte {f['changed_at']:,} of {pad} changed in place, its size and mtime kept. Its stat {stat}:",
        f"{f['stat_before']} in the memo, {f['stat_now']} now. The next run took {f['changed_s']:.1f} s and",
        f"read {f['changed_read']:,} bytes; the memo then held the new stat and the file's new sha256",
        f"(`{f['sha_before'][:16]}…` before, `{f['sha_after'][:16]}…` after; memo file {f['memo_bytes']:,} B).",
        f"Hashing {pad} alone right after, in one process, as every run did before the memo:",
        f"{f['hash_s']:.1f} s. Keys changed: {', '.join(changed) or 'none'}; unchanged: {', '.join(kept) or 'none'}.",
        "",
        "| stage | key before | key after |",
        "| --- | --- | --- |",
        *key_rows,
        "",
        "Checks: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in held_checks.items()) + ".",
    ]
    write_section("model_size", lines, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-gib", type=float, default=14.0, help="Random bytes added to the model's unet, GiB")
    parser.add_argument("--repeats", type=int, default=5, help="Warm runs per model")
    parser.add_argument("--quick", action="store_true", help="64 MiB in the VAE, stage latents, one warm run each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.pad_gib, args.repeats = 64 / 1024, 1
    with tempfile.TemporaryDirectory() as tmp, prefect_env(Path(tmp)) as env:  # the padded copy goes with the folder
        figures = measure(args, env, Path(tmp))
    write_results(figures, args.out, " ".join(["python", *sys.argv]))
    print(f"wrote {args.out}")
    sys.exit(0 if all(checks(figures).values()) else 1)


if __name__ == "__main__":
    main()
