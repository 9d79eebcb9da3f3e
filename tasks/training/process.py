"""The child as a process: its events for the stage, a watchdog on the stage that launched it, its peak memory."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState


def emit(event: str, **fields: Any) -> None:
    """One JSON line for the train stage, from the main process only (the others train in step with it)."""
    if PartialState().is_main_process:
        print(json.dumps({"event": event, **fields}), flush=True)


def watch_parent(pid: int) -> None:
    """Exit when the stage process that launched us is gone, so no orphan keeps training."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class PeakMemory:
    """Peak memory of this process, for memory.json: the training loop's and the export's, in MiB. On CUDA the
    allocator's peak (what the memory plan estimates); on a CPU the resident set's high-water mark."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if torch.cuda.is_available():
            self.peaks[phase] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peaks[phase] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux

    def write(self, folder: Path) -> None:
        kind = "cuda_allocated" if torch.cuda.is_available() else "cpu_rss"
        peaks = {phase: round(mib, 1) for phase, mib in self.peaks.items()}
        (folder / "memory.json").write_text(json.dumps({"kind": kind, "peak_mib": peaks}, indent=1))
