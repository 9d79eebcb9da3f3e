"""How the train stage starts the child: the accelerate settings boothflow owns, and the command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tasks.core.config import TrainSection


def accelerate_config(cfg: TrainSection) -> dict[str, Any]:
    """The launch settings boothflow owns: nothing from the user's accelerate folder (a DeepSpeed or FSDP default
    there would change or break the run). Several processes go through accelerate's multi-GPU launcher (torchrun),
    which is also what runs them on a CPU, where the child picks gloo."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if cfg.num_processes > 1 else "NO",
        "num_processes": cfg.num_processes,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": cfg.mixed_precision,
        "dynamo_config": {"dynamo_backend": "NO"},
        "use_cpu": False,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "downcast_bf16": "no",
    }


def launch_command(job_path: Path, config_file: Path, cfg: TrainSection) -> list[str]:
    """`accelerate launch` of `python -m tasks.training JOB.json` under the job's own accelerate config."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_cpu_threads_per_process", str(cfg.cpu_threads), "-m", "tasks.training", str(job_path),
    ]  # fmt: skip
