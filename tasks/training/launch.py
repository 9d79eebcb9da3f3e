"""How the train stage starts the child: the command, and for several processes the accelerate settings boothflow
owns."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.core.config import TrainSection
from tasks.sd.device import cpu_threads


def accelerate_config(cfg: TrainSection) -> dict[str, Any]:
    """The launch settings boothflow owns: nothing from the user's accelerate folder (a DeepSpeed or FSDP default
    there would change or break the run). Several processes go through accelerate's multi-GPU launcher (torchrun),
    which is also what runs them on a CPU, where the child picks gloo."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
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


def child_process(job_path: Path, cfg: TrainSection) -> tuple[list[str], dict[str, str]]:
    """The command that starts the training child, and what it adds to the environment. One process runs
    `python -m tasks.training JOB.json` itself: its Accelerator is given the precision and the device, so accelerate's
    launcher would add only its own start-up (1.7 s), the thread count and dynamo off, set here as the launcher sets
    them (so a user's ACCELERATE_DYNAMO_BACKEND changes nothing). Several run under `accelerate launch` with the job's
    own accelerate config, written beside the job."""
    child, threads = ["-m", "tasks.training", str(job_path)], str(cpu_threads(cfg.cpu_threads))
    if cfg.num_processes == 1:
        return [sys.executable, *child], {"OMP_NUM_THREADS": threads, "ACCELERATE_DYNAMO_BACKEND": "NO"}
    config_file = job_path.with_name("accelerate.yaml")
    config_file.write_text(yaml.safe_dump(accelerate_config(cfg)))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                "--num_cpu_threads_per_process", threads]  # fmt: skip
    return [*launcher, *child], {}
