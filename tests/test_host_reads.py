"""The training loop reads the device only at log steps: a read (`.item()`, `if tensor:`, a masked index, ...) makes
the host wait for the device, so one per step would leave the device idle while the host draws the next batch."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import INSTANCE_PROMPT, _encoded, _images, _job
from torch.overrides import TorchFunctionMode

from tasks.core.config import TrainSection
from tasks.core.store import Store
from tasks.stages import train
from tasks.training import loop
from tasks.training import step as one_step
from tasks.training.build import build_training

CLASS_PROMPT = "a photo of toy"
T = torch.Tensor
READS = {T.item, T.tolist, T.numpy, T.cpu, T.__bool__, T.__float__, T.__int__, T.__index__, T.__complex__,
         T.__format__, T.__repr__, T.nonzero, torch.nonzero, T.argwhere, torch.argwhere, T.masked_select,
         torch.masked_select, T.unique, torch.unique}  # fmt: skip


def _masked(index: object) -> bool:
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


class HostReads(TorchFunctionMode):
    """Every call that reads a tensor's values on the host, in order, with `mark`s between them. On a CPU every tensor
    is on the host, so what stays there on CUDA too is left out: the batch drawn on the host (`paused`) and the
    optimizer's step counts (`host_tensors`: torch's AdamW keeps them on the CPU unless capturable or fused)."""

    def __init__(self, host_tensors: Callable[[], list[torch.Tensor]] = list) -> None:
        super().__init__()
        self.host_tensors, self.events, self.pause = host_tensors, [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = func in READS or (func in (T.__getitem__, T.__setitem__) and _masked(args[1]))
        read = read or (func is torch.where and len(args) + len(kwargs) == 1)
        if read and not self.pause and not any(args[0] is kept for kept in self.host_tensors()):
            self.events.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def mark(self) -> None:
        self.events.append(None)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause += 1
        try:
            yield
        finally:
            self.pause -= 1

    def per_mark(self) -> list[list[str]]:
        """The reads after each mark."""
        groups: list[list[str]] = []
        for event in self.events:
            if event is None:
                groups.append([])
            elif groups:
                groups[-1].append(event)
        return groups


x = torch.tensor([1.5, -2.0, 3.0])
KINDS = {
    "item": lambda: x.sum().item(),
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "cpu": lambda: x.cpu(),
    "if": lambda: 1 if x.sum() > 0 else 0,
    "float": lambda: float(x.sum()),
    "int": lambda: int(x.sum()),
    "index a list": lambda: [0, 1, 2][x.argmax()],
    "format": lambda: f"{x.sum():.3f}",
    "masked index": lambda: x[x > 0],
    "masked assignment": lambda: x.clone().__setitem__(x > 0, 0.0),
    "nonzero": lambda: x.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(x),
    "masked_select": lambda: x.masked_select(x > 0),
    "one-argument where": lambda: torch.where(x > 0),
    "unique": lambda: x.unique(),
}


@pytest.mark.parametrize("read", KINDS.values(), ids=KINDS.keys())
def test_the_counter_sees_every_kind_of_host_read(read: Callable[[], object]) -> None:
    with HostReads() as reads:
        reads.mark()
        read()
    assert len(reads.per_mark()[0]) == 1
    with HostReads() as none:
        none.mark()
        torch.where(x > 0, x, -x).sum() * 2  # stays on the device
    assert none.per_mark() == [[]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("host-reads")
    _images(root / "images")
    return root


def _with_class_images(lat_path: Path, folder: Path) -> Path:
    """The latents again as class images too: a batch of both kinds, without rendering class images."""
    shutil.copytree(lat_path, folder)
    index = pd.read_csv(folder / "index.csv", dtype=str)
    classes = index.assign(id="class-" + index.id, kind="class")
    pd.concat([index, classes]).to_csv(folder / "index.csv", index=False)
    return folder


CASES = {  # both with prior preservation: class images in the batch, weighted by the objective's kind weights
    "sd15 full, text encoder, accumulation": ("tiny-sd15", {"method": "full", "grad_accum": 2}),
    "sdxl lora, cached embeddings, min-snr": ("tiny-sdxl", {"method": "lora", "train_text_encoder": False,
                                                            "snr_gamma": 5.0}),
}  # fmt: skip
STEPS, LOG_EVERY = 3, 2
LOG_STEP_READS = [0, 1, 1]  # step 2 is a log step, and so is the last: one read each, none elsewhere


@pytest.fixture
def threads() -> Iterator[None]:
    """The trainer sets this process's torch threads (one here: tiny steps on two busy cores wait on each other)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("model_id", "settings"), CASES.values(), ids=CASES.keys())
def test_the_training_loop_reads_the_device_only_at_log_steps(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: None, model_id: str, settings: dict
) -> None:
    model, _, lat = _encoded(workspace, model_id, workspace / "images")
    cfg = TrainSection(**settings, steps=STEPS, log_every=LOG_EVERY, learning_rate=1e-3, checkpoint_every=0,
                       checkpoint_minutes=0, cpu_threads=1)  # fmt: skip
    prompts = [INSTANCE_PROMPT, CLASS_PROMPT]
    embeds = None if cfg.train_text_encoder else train.cache_text_embeddings(model, prompts, Store(workspace))
    job = _job(model, lat, cfg, tmp_path, embeds).model_copy(
        update={"latents_dir": _with_class_images(lat.path, tmp_path / "latents"), "class_prompt": CLASS_PROMPT,
                "prior_weight": 0.5}
    )  # fmt: skip
    t = build_training(job)
    t.prepare()

    def reads_per_step(start: int) -> list[int]:
        reads = HostReads(lambda: [state["step"] for state in t.optimizer.state.values()])
        with pytest.MonkeyPatch.context() as patch, reads:
            patch.setattr(one_step, "make_batch", _paused(reads, one_step.make_batch))
            patch.setattr(loop, "optimizer_step_on_device", _marked(reads, loop.optimizer_step_on_device))
            loop.run_steps(t, start, [])
        return [len(step) for step in reads.per_mark()]

    assert reads_per_step(0) == LOG_STEP_READS
    # The count is not blind: a `.item()` on each micro-batch's loss shows up in a step and in a log step.
    monkeypatch.setattr(one_step, "training_step", _read_after(one_step.training_step))
    assert reads_per_step(STEPS - 2) == [reads + cfg.grad_accum for reads in LOG_STEP_READS[-2:]]


def _paused(reads: HostReads, function: Callable) -> Callable:
    def host_side(*args, **kwargs):
        with reads.paused():
            return function(*args, **kwargs)

    return host_side


def _marked(reads: HostReads, function: Callable) -> Callable:
    def step(*args, **kwargs):
        reads.mark()
        return function(*args, **kwargs)

    return step


def _read_after(function: Callable) -> Callable:
    def step(*args, **kwargs):
        loss = function(*args, **kwargs)
        loss.item()
        return loss

    return step
