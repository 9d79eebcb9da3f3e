"""How long a checkpoint stops training: the time the loop is blocked by one checkpoint (the host copy the background
writer takes, and any wait for it) beside the time the checkpoint takes to write, for at least 1 GiB of state.

The checkpoint goes through the trainer's own CheckpointWriter and save_checkpoint; the model is a wide stack of
Linear layers trained with AdamW (state = weights + two moments), so 1 GiB of state costs no UNet's compute. It runs
on CUDA when present, else on the CPU, and also reports how much slower the steps run while the write goes on.

    .venv/bin/python benchmarks/checkpoint_stall.py            # >= 1 GiB of state (about a minute on 2 CPU cores)
    .venv/bin/python benchmarks/checkpoint_stall.py --quick    # a few MB, seconds, one thread; the suite runs it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import RESULTS, write_section

from tasks.core.config import TrainSection
from tasks.training.checkpoints import CheckpointWriter, HostStaging, complete_checkpoints, save_checkpoint
from tasks.training.job import TrainJob

TARGET = 0.10  # the loop may be blocked for at most this fraction of the write


def wide_model(width: int, layers: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def job_for(folder: Path) -> TrainJob:
    """A job whose only use is where checkpoints go and how many are kept."""
    return TrainJob(
        family="sd15", base=folder, latents_dir=folder, out_dir=folder, checkpoints_dir=folder,
        train=TrainSection(keep_checkpoints=1), optimizer="adamw", instance_prompt="", class_prompt=None,
        prior_weight=0.0, text_embeds=None, parent_pid=os.getpid(), facts={},
    )  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(width: int, layers: int, folder: Path, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = wide_model(width, layers, device)
    batch = torch.randn(8, width, device=device)
    params, state, job = dict(model.named_parameters()), {"optimizer": optimizer}, job_for(folder)

    def step() -> float:
        """One optimizer step; its seconds, measured to the end of its work on the device."""
        started = time.perf_counter()
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - started

    for _ in range(3):  # warm-up; AdamW's state exists from the first step
        step()
    plain = statistics.median(step() for _ in range(5))
    weights, states = HostStaging().copy((params, {name: part.state_dict() for name, part in state.items()}))
    state_bytes = _bytes(weights) + _bytes(states)
    started = time.perf_counter()  # the write alone, as the background thread does it (and a CPU's loop waits for)
    save_checkpoint(job, 1, weights, states, [])
    write = time.perf_counter() - started
    del weights, states

    writer = CheckpointWriter(job, background=True)
    started = time.perf_counter()
    writer.save(2, params, state, [])  # the first checkpoint allocates the host buffers; the next ones reuse them
    first = time.perf_counter() - started
    writer.wait()
    steps = math.ceil(write / plain) + 1  # enough to outlast the write
    blocked, lost = [], []
    for checkpoint in range(3, 3 + repeats):
        without = sum(step() for _ in range(steps))
        started = time.perf_counter()
        writer.save(checkpoint, params, state, [])
        saving = time.perf_counter() - started
        beside = sum(step() for _ in range(steps))
        started = time.perf_counter()
        writer.wait()
        blocked.append(saving + time.perf_counter() - started)
        lost.append(blocked[-1] + beside - without)
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "state_gib": state_bytes / 2**30,
        "step_s": plain,
        "write_s": write,
        "first_blocked_s": first,
        "blocked_s": statistics.median(blocked),
        "blocked_share": statistics.median(blocked) / write,
        "lost_s": statistics.median(lost),
        "lost_share": statistics.median(lost) / write,
        "steps_beside": steps,
        "repeats": repeats,
        "kept": [path.name for path in complete_checkpoints(folder)],  # keep_checkpoints=1: the last write, whole
    }


def _bytes(tree: object) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_bytes(item) for item in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_bytes(item) for item in tree)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few MB of state: seconds")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; quick: 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="RESULTS.md to write (default: benchmarks' own; quick: none)"
    )
    args = parser.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.threads or args.quick:  # tiny steps on threads that share busy cores wait on each other for whole slices
        torch.set_num_threads(args.threads or 1)
    width, layers = (256, 4) if args.quick else (4096, 6)  # AdamW state: 3 x 4 bytes x 6 x 4096^2 = 1.1 GiB
    # the writer reports each checkpoint to the train stage on stdout; here that stays out of the result lines
    with tempfile.TemporaryDirectory(dir=args.dir) as folder, contextlib.redirect_stdout(sys.stderr):
        result = measure(width, layers, Path(folder), 1 if args.quick else 3)
    print(json.dumps(result))
    verdict = "within" if result["blocked_share"] < TARGET else "OVER"
    summary = (
        f"{result['state_gib']:.2f} GiB of state on {result['device']}: the write takes {result['write_s']:.2f} s; in"
        f" the background the loop is blocked {result['blocked_s']:.3f} s ({100 * result['blocked_share']:.1f}% of"
        f" the write, {verdict} the {100 * TARGET:.0f}% target; {result['first_blocked_s']:.3f} s the first time,"
        f" which allocates the host buffers), and {result['steps_beside']} steps beside the write plus that block"
        f" cost {result['lost_s']:.2f} s more than the same steps alone ({100 * result['lost_share']:.1f}% of the"
        f" write; medians of {result['repeats']})"
    )
    print(summary)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        command = " ".join(["python", *sys.argv])
        machine = f"Machine: {os.cpu_count()} CPUs, load {load} before the run, {torch.get_num_threads()} threads."
        when = f"Command: `{command}` ({time.strftime('%Y-%m-%d')})."
        lines = ["# Checkpoint stall", "", f"{machine} {when}", "", summary]
        write_section("checkpoint_stall", lines, out)


if __name__ == "__main__":
    main()
