"""Training time per optimizer step: the compute floor, the train stage's cached loop, a re-encoding reference, and
the cached loop through `boothflow stage train` with its temporary Prefect server, measured side by side.

(a) floor: the same model and batch on fixed tensors (text encoder and UNet forward and backward, optimizer step);
(a') clipped: the floor plus the recipe's gradient clipping (train.max_grad_norm) and learning-rate schedule step,
    so (b)/(a') is what drawing the batch from the cache and the loop's bookkeeping cost;
(b) cached: the train stage's own step (`optimizer_step_on_device`), drawing latents from the latent cache;
(c) reference: that loop with every sample's PNG decoded and encoded through the VAE at every step, as diffusers'
    train_dreambooth.py does; (d) cli: (b) in the training child of `boothflow stage train` in ephemeral mode;
(e) child: the same child launched as the train stage launches it, with no Prefect anywhere, so (d)/(e) is what the
    temporary Prefect server and the flow process cost the training.
Per-step time is the slope between two step counts of one run, so start-up cancels; repetitions are interleaved
and the median is reported, beside the FLOP ratio (c)/(b) counted with torch.utils.flop_counter.
Usage: .venv/bin/python benchmarks/train_throughput.py [--quick] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from PIL import Image
from results import write_section
from torch.utils.flop_counter import FlopCounterMode

from tasks.core.config_load import load_config
from tasks.core.store import Store
from tasks.sd.latent_dist import scale_latent
from tasks.sd.models import resolve
from tasks.stages import latents, preprocess, train
from tasks.training.build import Training, build_training
from tasks.training.data import LatentData
from tasks.training.job import TrainJob
from tasks.training.step import Batch, apply_gradients, make_batch, optimizer_step_on_device, training_step

REPO = Path(__file__).resolve().parents[1]
BOOTHFLOW = Path(sys.executable).parent / "boothflow"
DATASETS = {"toy-sd": "data/toy", "tiny-sd15": "data/demo"}
MODES = ("floor", "clipped", "cached", "reference", "cli", "child")


class ReencodedData(LatentData):
    """The reference formulation: each draw decodes the sample's PNG and encodes it through the VAE."""

    def __init__(self, folder: Path, images: Path, vae: AutoencoderKL) -> None:
        super().__init__(folder)
        self.images, self.vae = images, vae
        self.encodes = 0  # draws so far: how a run shows it went through the VAE

    @torch.no_grad()
    def draw(self, sample_id: str, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.encodes += 1
        with Image.open(self.images / f"{sample_id}.png") as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = self.vae.encode(pixels.to(self.vae.device)).latent_dist.sample(rng).cpu()
        return scale_latent(z, self.scaling, self.shift), self.time_ids[sample_id, ""]


def prepare(overrides: list[str], root: Path) -> tuple[Path, TrainJob]:
    """Preprocess and latents through the stages themselves (so `boothflow stage train` finds them cached), and the
    job the train stage would hand its child."""
    config = load_config(None, overrides, root / "artifacts")
    store = Store(config.run.artifacts_root)
    model = resolve(config.model.id, "", config.run.artifacts_root)
    prepared = preprocess.run(config.preprocess, preprocess.PreprocessInputs.of(config), store)
    encoded = latents.run(config.latents, latents.LatentsInputs(model, prepared, None), store)
    inputs = train.TrainInputs.of(config, model, encoded, prepared)
    job = train.make_job(config.train, inputs, root / "out", root / "ckpt", embeds=None)  # the text encoder trains
    return prepared.path / "images", job


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_step(run_step: Callable[[int], None], device: torch.device, first: int, last: int) -> float:
    """Seconds per step from the slope between step counts `first` and `last` of one run."""
    marks = {}
    started = time.perf_counter()
    for step in range(last):
        run_step(step)
        if step + 1 in (first, last):
            _sync(device)
            marks[step + 1] = time.perf_counter() - started
    return (marks[last] - marks[first]) / (last - first)


def floor_step(t: Training, batch: Batch, clipped: bool = False) -> Callable[[int], None]:
    def run_step(step: int) -> None:
        with t.accelerator.autocast():
            loss = training_step(t.unet, t.conditioner, t.objective, batch)
        t.accelerator.backward(loss)
        if clipped:  # the loop's own update: clipping, the optimizer, the schedule
            apply_gradients(t)
        else:
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)

    return run_step


def cli_per_step(config_overrides: list[str], root: Path, seed: int, first: int, last: int) -> float:
    """`boothflow stage train` in ephemeral mode (in $PREFECT_HOME when set, as the user's runs are, else a private
    home); the slope of the child's own step clock (metrics.csv seconds)."""
    env = {"PREFECT_HOME": str(root / "prefect-home"), **os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    summary = root / f"cli-{seed}.json"
    command = [BOOTHFLOW, "stage", "train", "--artifacts", root / "artifacts", "--summary", summary,
               *[arg for o in config_overrides for arg in ("--set", o)], "--set", f"train.seed={seed}"]  # fmt: skip
    subprocess.run(list(map(str, command)), cwd=REPO, env=env, check=True, capture_output=True)
    losses = json.loads(summary.read_text())["outputs"]["loss_csv"]
    seconds = pd.read_csv(losses).set_index("step")["seconds"]
    return (seconds[last] - seconds[first]) / (last - first)


def child_per_step(job: TrainJob, root: Path, seed: int, first: int, last: int) -> float:
    """The train stage's child launched as the stage launches it (`train.launch`), from this process, no Prefect."""
    folder = root / f"child-{seed}"
    job = job.model_copy(update={"train": job.train.model_copy(update={"seed": seed}), "out_dir": folder / "out",
                                 "checkpoints_dir": folder / "ckpt"})  # fmt: skip
    job.checkpoints_dir.mkdir(parents=True)
    job_path = job.checkpoints_dir / "job.json"
    job_path.write_text(job.model_dump_json())
    train.launch(job_path, job.train)
    seconds = pd.read_csv(job.out_dir / "metrics.csv").set_index("step")["seconds"]
    return (seconds[last] - seconds[first]) / (last - first)


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def measure(model_id: str, work: Path, first: int, last: int, reps: int, batch: int) -> dict:
    overrides = [f"data.instance_dir='{REPO / DATASETS[model_id]}'", f"model.id='{model_id}'",
                 "preprocess.resolution=64", "preprocess.min_side=64", "prior.enabled=false", "train.method='full'",
                 "train.train_text_encoder=true", f"train.batch_size={batch}", f"train.steps={last}",
                 "train.checkpoint_every=0", "train.sample_every=0"]  # fmt: skip
    root = work / model_id
    images, job = prepare(overrides, root)
    t = build_training(job)
    t.prepare()
    device = t.accelerator.device
    cached_data = t.data
    vae = AutoencoderKL.from_pretrained(job.base / "vae").to(device)  # the preset's own: no model.vae here
    reference_data = ReencodedData(job.latents_dir, images, vae)
    fixed = make_batch(cached_data, t.objective, job, 0, 0).to(device)

    def cached(step: int) -> None:
        optimizer_step_on_device(t, step)

    runs = {"floor": lambda: floor_step(t, fixed), "clipped": lambda: floor_step(t, fixed, clipped=True),
            "cached": lambda: cached, "reference": lambda: cached}  # fmt: skip
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    encodes = dict.fromkeys(runs, 0)  # during each mode's runs: what tells (c) from (b) besides the time
    for rep in range(reps):
        for mode in MODES:
            if mode == "cli":
                times[mode].append(cli_per_step(overrides, root, 1000 + rep, first, last))
                continue
            if mode == "child":
                times[mode].append(child_per_step(job, root, 1000 + rep, first, last))
                continue
            t.data = reference_data if mode == "reference" else cached_data
            before = reference_data.encodes
            times[mode].append(per_step(runs[mode](), device, first, last))
            encodes[mode] += reference_data.encodes - before
        print(model_id, rep, {m: f"{v[-1] * 1e3:.1f} ms" for m, v in times.items()}, flush=True)
    t.data = cached_data

    def train_once() -> None:
        floor_step(t, fixed)(0)

    def encode_batch() -> None:
        for position in range(batch):
            reference_data.draw(cached_data.pick("instance", position, 0), torch.Generator().manual_seed(0))

    train_flops, encode_flops = flops(train_once), flops(encode_batch)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {"model": model_id, "batch": batch, "threads": job.train.cpu_threads, "median": medians,
            "all": times, "encodes": encodes, "flop_ratio": (train_flops + encode_flops) / train_flops,
            "train_gflop": train_flops / 1e9}  # fmt: skip


def write_results(rows: list[dict], out: Path, command: str, load: str) -> None:
    lines = [
        "# Training throughput",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, load before the run {load}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Per-step times are medians over interleaved "
        "repetitions, each the slope between two step counts of one run.",
        "",
        "| model | batch | threads | floor (a) ms | clipped (a') ms | cached (b) ms | reference (c) ms | CLI (d) ms "
        "| child (e) ms | (b)/(a) | (b)/(a') | (c)/(b) | FLOP ratio (c)/(b) | (d)/(e) | GFLOP per step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        m = r["median"]
        cells = [r["model"], r["batch"], r["threads"], *(f"{m[k] * 1e3:.1f}" for k in MODES),
                 f"{m['cached'] / m['floor']:.3f}", f"{m['cached'] / m['clipped']:.3f}",
                 f"{m['reference'] / m['cached']:.3f}", f"{r['flop_ratio']:.3f}",
                 f"{m['cli'] / m['child']:.3f}", f"{r['train_gflop']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Every repetition (ms per step):", ""]
    for r in rows:
        for mode in MODES:
            lines.append(f"- {r['model']} {mode}: " + ", ".join(f"{v * 1e3:.1f}" for v in r["all"][mode]))
    lines += ["", "VAE encodes in the in-process runs above, all repetitions (only the reference (c) encodes):", ""]
    for r in rows:
        lines.append(f"- {r['model']}: " + ", ".join(f"{mode} {count}" for mode, count in r["encodes"].items()))
    write_section("train_throughput", lines, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--steps", nargs=2, type=int, default=(5, 55), metavar=("FIRST", "LAST"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny-sd15, steps 1 and 2, one repetition")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.reps = ["tiny-sd15"], (1, 2), 1
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, Path(tmp), *args.steps, args.reps, args.batch) for model in args.models]
    write_results(rows, args.out, " ".join(["python", *sys.argv[:1], *sys.argv[1:]]), load)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
