"""The accelerator the flow's own stages render and encode on, and giving its memory back after each stage.

Every model a stage loads in the flow process is registered here, so a test can prove none outlives its stage
(the training child then has the GPU to itself).
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import TypeVar

import torch

T = TypeVar("T")

DEFAULT_CPU_THREADS = 2
_loaded: weakref.WeakSet = weakref.WeakSet()
_loads = [0]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_threads(given: int | None) -> int:
    """Torch threads of a training process on a CPU (its results depend on them): `given`, else the OMP_NUM_THREADS
    this process was given (a share of the cores that a scheduler, a container or a test suite set), else 2."""
    if given is not None:
        return given
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else DEFAULT_CPU_THREADS


def loaded(model: T) -> T:
    """Register a model (module or pipeline) the flow process just loaded; returns it."""
    _loaded.add(model)
    _loads[0] += 1
    return model


def loads() -> int:
    """How many models this process has registered so far."""
    return _loads[0]


def resident() -> list[object]:
    """Registered models still alive (after a collection)."""
    gc.collect()
    return list(_loaded)


def release() -> None:
    """Collect what a finished stage dropped and hand CUDA's cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
