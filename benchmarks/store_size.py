"""A warm rerun over a store whose train entry holds at least 2 GB costs what one over the demo's store costs, and
`boothflow cache verify` still finds one flipped byte in that entry.

Runs the demo cold once and copies its store; in the copy, the train entry the flow looks up is recommitted (same
key, its own files plus random bytes in `padding.bin`, through `Store.get_or_create` like any entry). Warm
`boothflow run`s over the two stores are timed in turns, beside a bare `Store.get` of each train entry and a full
re-hash of the padded one (what every lookup cost before stat memos). Then one byte of the padding is flipped with
its mtime put back and `boothflow cache verify` must name it. Reports to $PREFECT_API_URL when set, else to a
private server.
Usage: .venv/bin/python benchmarks/store_size.py [--pad-gib 2] [--repeats 5] [--out benchmarks/RESULTS.md]
`--quick` does the same with `boothflow stage preprocess` and its entry, padded by 4 MiB, once each: no training,
seconds (the suite runs it so the script never rots).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rerun import BOOTHFLOW, REPO, timed_run
from results import RESULTS, write_section

from flows.server import api_url, free_port, start_server, stop_server, wait_healthy
from tasks.core.atomic import link_or_copy
from tasks.core.manifest import MANIFEST, STAT_MEMO
from tasks.core.store import Store

RUN, QUICK = (["run"], "train"), (["stage", "preprocess"], "preprocess")  # the command and the entry it pads
PADDING = "padding.bin"
CHUNK = 64 * 2**20


def pad_entry(store: Store, stage: str, key: str, pad_bytes: int, aside: Path) -> None:
    """Recommit `stage`'s entry `key` with its own files (hard links to the original, moved to `aside`) plus
    `pad_bytes` of random bytes: an entry the flow's stage looks up like the one it made, only bigger."""
    made = store.get(stage, key)
    store.path(stage, key).rename(aside)

    def build(folder: Path) -> dict:
        skip = shutil.ignore_patterns(MANIFEST, f"{STAT_MEMO}*")
        shutil.copytree(aside, folder, copy_function=link_or_copy, ignore=skip, dirs_exist_ok=True)
        with (folder / PADDING).open("wb") as f:
            for left in range(pad_bytes, 0, -CHUNK):
                f.write(os.urandom(min(CHUNK, left)))
        return made.info

    store.get_or_create(stage, key, build, made.manifest["config"])


def flip_byte_keeping_mtime(file: Path, offset: int) -> None:
    """Damage a size or an mtime would not show: one bit of one byte, the mtime put back as `touch -r` would."""
    before = file.stat()
    with file.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def lookup_ms(store: Store, stage: str, key: str, repeats: int = 20) -> float:
    """Median wall time of `Store.get` of the padded stage's entry, in ms."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert store.get(stage, key) is not None
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def warm_run(command: list, env: dict[str, str], summary: Path) -> float:
    """Wall time of one warm `boothflow run`; every stage must be a cache hit."""
    took, result = timed_run(command, env, summary)
    assert all(s["status"] == "cached" for s in result["stages"].values() if s["status"] != "skipped"), result
    return took


def measure(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict:
    """The demo's store and a copy whose entry of the padded stage is padded, warm runs over them taken in turns (so a
    change of load hits both), then the flipped byte."""
    demo, padded = work / "demo", work / "padded"
    command, stage = QUICK if args.quick else RUN
    run = [BOOTHFLOW, *command, "--config", "configs/demo.toml", "--artifacts"]
    took, cold = timed_run([*run, demo], env, work / "cold.json")
    print(f"cold run: {took:.2f} s", flush=True)
    key = cold["stages"][stage]["key"]
    shutil.copytree(demo, padded)
    assert Store(padded).verify().damaged == []  # new inodes: the copy's memos, refreshed once, as a lookup would
    pad_entry(Store(padded), stage, key, int(args.pad_gib * 2**30), work / "as-made")
    stores = {"demo": demo, "padded": padded}
    sizes = {name: sum(m["size"] for m in Store(root).get(stage, key).manifest["files"].values())
             for name, root in stores.items()}  # fmt: skip
    started = time.monotonic()
    assert Store(padded).verify(stage).damaged == []
    figures = {"stage": stage, "command": " ".join(command), "key": key, "sizes": sizes,
               "full_check_s": time.monotonic() - started, "load_before": os.getloadavg()}  # fmt: skip
    figures["lookup_ms"] = {name: lookup_ms(Store(root), stage, key) for name, root in stores.items()}
    figures["warm"] = {"demo": [], "padded": []}
    for n in range(args.repeats):
        for name, root in stores.items():
            figures["warm"][name].append(warm_run([*run, root], env, work / f"{name}-{n}.json"))
            print(f"warm over the {name} store: {figures['warm'][name][-1]:.2f} s", flush=True)
    figures["load_after"] = os.getloadavg()

    padding = Store(padded).path(stage, key) / PADDING
    figures["flipped_at"] = padding.stat().st_size // 2
    flip_byte_keeping_mtime(padding, figures["flipped_at"])
    found_by_lookup = Store(padded).inspect(stage, key)  # its ctime moved: a lookup re-hashes it (and sets it aside)
    figures["lookup_sees_flip"] = isinstance(found_by_lookup, list)
    started = time.monotonic()
    verify = subprocess.run([BOOTHFLOW, "cache", "verify", "--artifacts", padded], cwd=REPO, env=env,
                            capture_output=True, text=True)  # fmt: skip
    figures["verify_s"], figures["verify_rc"] = time.monotonic() - started, verify.returncode
    figures["verify_lines"] = [line for line in verify.stdout.splitlines() if line.startswith("damaged:")]
    print(verify.stdout, flush=True)
    return figures


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def write_results(f: dict, out: Path, command: str) -> None:
    demo, padded = statistics.median(f["warm"]["demo"]), statistics.median(f["warm"]["padded"])
    load = f"{_seconds(f['load_before'])} before the warm runs, {_seconds(f['load_after'])} after"
    named = "; ".join(f"`{line}`" for line in f["verify_lines"]) or "nothing"
    seen = "also refuses the entry (its ctime moved)" if f["lookup_sees_flip"] else "serves it"
    pad, runs = f["sizes"]["padded"] - f["sizes"]["demo"], len(f["warm"]["demo"])
    pairs = [p - d for d, p in zip(f["warm"]["demo"], f["warm"]["padded"], strict=True)]
    gaps = {"the difference of the medians": padded - demo, "the paired median": statistics.median(pairs)}
    held = [name for name, gap in gaps.items() if gap <= 1.0]
    verdict = f"it holds by {' and by '.join(held)}" if held else "it does not hold"
    stage, boothflow = f["stage"], f"`boothflow {f['command']}`"
    rows = [
        f"| {label} | {f['sizes'][name]:,} B | {f['lookup_ms'][name]:.2f} | "
        f"{statistics.median(f['warm'][name]):.2f} | {_seconds(f['warm'][name])} |"
        for name, label in (("demo", "demo's"), ("padded", f"{stage} entry padded"))
    ]
    lines = [
        "# Warm rerun over a big store, and `cache verify`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average (1, 5, 15 min) {load}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). `configs/demo.toml` runs cold once; a copy of its",
        f"store has the {stage} entry recommitted under the same key with its own files plus {pad:,} random bytes in",
        f"`{PADDING}`, so the flow's {stage} stage looks up a {f['sizes']['padded'] / 2**30:.2f} GiB entry there.",
        f"Warm runs: fresh {boothflow} processes against a running Prefect server, over the two stores in turns;",
        f"medians of {runs}.",
        "",
        f"| store | {stage} entry | `Store.get` of it (median ms) | warm {boothflow} (median s) | each run (s) |",
        "| --- | ---: | ---: | ---: | --- |",
        *rows,
        "",
        f"Difference of the medians: {padded - demo:+.2f} s. Paired differences (each padded run minus the demo run",
        f"just before it, which shares its load): {_seconds(pairs)}; median {statistics.median(pairs):+.2f} s.",
        f"The figure allows +1 s: {verdict}.",
        f"A full re-hash of the padded entry (`Store.verify('{stage}')`, what every lookup cost before stat memos, its",
        f"file fresh in the page cache): {f['full_check_s']:.1f} s.",
        f"Byte {f['flipped_at']:,} of `{PADDING}` flipped, mtime put back with os.utime:",
        f"a plain lookup {seen}; `boothflow cache verify` exits {f['verify_rc']} in {f['verify_s']:.1f} s",
        f"and names {named}.",
    ]
    write_section("store_size", lines, out)


@contextlib.contextmanager
def prefect_env(work: Path) -> Iterator[dict[str, str]]:
    """This environment, reporting to $PREFECT_API_URL when set, else to a private server in `work` that stops with
    the block."""
    env = {**os.environ}
    if "PREFECT_API_URL" in env:
        yield env
        return
    port, log = free_port(), work / "server.log"
    server = start_server(port, work / "server-home", log)
    try:
        wait_healthy(server, api_url(port), 120, log)
        yield env | {"PREFECT_API_URL": api_url(port), "PREFECT_HOME": str(work / "client-home")}
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-gib", type=float, default=2.0, help="Random bytes added to the entry, GiB")
    parser.add_argument("--repeats", type=int, default=5, help="Warm runs per store")
    parser.add_argument("--quick", action="store_true", help="the preprocess entry, 4 MiB, one warm run each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.pad_gib, args.repeats = 4 / 1024, 1
    with tempfile.TemporaryDirectory() as tmp, prefect_env(Path(tmp)) as env:
        figures = measure(args, env, Path(tmp))
    write_results(figures, args.out, " ".join(["python", *sys.argv]))
    found = [f"damaged: {figures['stage']} {figures['key']} {PADDING}: bytes differ from the manifest's sha256"]
    print(f"wrote {args.out}")
    sys.exit(0 if figures["verify_rc"] == 1 and figures["verify_lines"] == found else 1)


if __name__ == "__main__":
    main()
