"""The GPU check: training steps/s, rendering images/s and peak CUDA memory of the full-size presets, one setting
toggled at a time, each beside the memory plan's estimate, and per training case the compute floor (a) and, for the
baselines, the re-encoding reference (c) of benchmarks/train_throughput.py beside the cached loop (b). It imports no
Prefect, and on a bare CUDA machine with Python and torch it names the packages it still needs. Each case runs in
its own process (a clean peak), most telling first; results are rewritten after every case, and with `--budget`
the cases that would start after it are listed as not run.

    python benchmarks/gpu_check.py --out DIR           # 11 training, 4 rendering, 2 checkpoint cases (minutes)
    python benchmarks/gpu_check.py --smoke --out DIR   # the tiny presets, seconds; the suite runs it on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the check imports besides torch: import name -> distribution name (pinned in constraints.txt).
NEEDS = {
    **{name: name for name in ("diffusers", "transformers", "accelerate", "peft", "pydantic", "safetensors", "pandas")},
    **{name: name for name in ("filelock", "rich", "tokenizers")},
    **{"PIL": "pillow", "yaml": "pyyaml", "huggingface_hub": "huggingface-hub"},
}
OPTIONAL = {"bitsandbytes": "8-bit Adam", "xformers": "the xformers attention case"}
SD15 = {"method": "full", "train_text_encoder": True}
SDXL = {"method": "lora", "train_text_encoder": False}
PROMPT = "a photo of sks dog"


@dataclass(frozen=True)
class Case:
    """One training configuration: a preset at a resolution with some train settings toggled."""

    name: str
    preset: str
    resolution: int
    settings: dict = field(default_factory=dict)
    requires: str = ""  # an optional package the case needs; skipped without it
    reference: bool = False  # also time the re-encoding reference (c)


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint writer as training uses it on CUDA: the state copied into pinned host buffers without blocking,
    written by a thread while the steps go on, then restored into a fresh training bit for bit."""

    preset: str
    resolution: int
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.preset} checkpoint while training"


@dataclass(frozen=True)
class Render:
    """One rendering case: `batch` images of a preset in one call."""

    preset: str
    side: int
    batch: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.preset} generate batch {self.batch}"


SD15_FULL = [
    Case("sd15 fp32", "sd15-arch", 512, SD15, reference=True),
    Case("sd15 bf16", "sd15-arch", 512, SD15 | {"mixed_precision": "bf16"}),
    Case("sd15 fp16", "sd15-arch", 512, SD15 | {"mixed_precision": "fp16"}),
    Case("sd15 fp32 without TF32", "sd15-arch", 512, SD15 | {"tf32": False}),
    Case("sd15 channels-last", "sd15-arch", 512, SD15 | {"channels_last": True}),
]
SDXL_FULL = [
    Case("sdxl bf16", "sdxl-arch", 1024, SDXL | {"mixed_precision": "bf16"}, reference=True),
    Case("sdxl fp32", "sdxl-arch", 1024, SDXL),
]
LATER = [
    Case("sd15 torch.compile", "sd15-arch", 512, SD15 | {"compile_unet": True}),
    Case("sd15 checkpointing", "sd15-arch", 512, SD15 | {"gradient_checkpointing": True}),
    Case("sdxl checkpointing", "sdxl-arch", 1024, SDXL | {"gradient_checkpointing": True}),
    Case("sd15 8-bit Adam", "sd15-arch", 512, SD15 | {"optimizer": "adamw8bit"}, requires="bitsandbytes"),
    Case("sd15 xformers", "sd15-arch", 512, SD15 | {"attention": "xformers"}, requires="xformers"),
]
RENDERS = [Render(preset, side, batch, 20) for preset, side in (("sd15-arch", 512), ("sdxl-arch", 1024))
           for batch in (1, 4)]  # fmt: skip
CHECKPOINTS = [Checkpoint("sd15-arch", 512, SD15), Checkpoint("sdxl-arch", 1024, SDXL | {"mixed_precision": "bf16"})]
FULL = [*SD15_FULL, *SDXL_FULL, *RENDERS, *CHECKPOINTS, *LATER]
CHILD_LIMIT = 240  # seconds one case may take: a stuck compilation leaves the later cases their time
SMOKE = [
    Case("sd15 fp32", "tiny-sd15", 64, SD15, reference=True),
    Case("sdxl fp32", "tiny-sdxl", 64, SDXL),
    *[Render(preset, 64, batch, 2) for preset in ("tiny-sd15", "tiny-sdxl") for batch in (1, 2)],
    Checkpoint("tiny-sd15", 64, SD15),
]


def missing_packages() -> list[str]:
    """Pinned requirements (from constraints.txt) of the packages this Python lacks."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    versions = {name.lower().replace("_", "-"): version for name, version in pins}
    absent = [dist for module, dist in NEEDS.items() if importlib.util.find_spec(module) is None]
    return [f"{dist}=={versions[dist]}" if dist in versions else dist for dist in absent]


def peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_latents(folder: Path, arch, side: int, count: int = 4) -> Path:
    """A latents stage's output for `count` random images: what the trainer reads, without a VAE or images."""
    import torch

    from tasks.sd.latent_dist import save_latent
    from tasks.sd.memory import latent_side

    latent = latent_side(arch, side)
    channels = arch.configs["vae"]["latent_channels"]
    (folder / "items").mkdir(parents=True)
    sizes = {"original_size": f"{side},{side}", "crop_top_left": "0,0", "target_size": f"{side},{side}"}
    rows = ["id,kind,file"]
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {name: torch.randn(channels, latent, latent, generator=generator) for name in ("mean", "logvar")}
        save_latent(folder / "items" / f"{i}.safetensors", tensors, sizes)
        rows.append(f"s{i},instance,items/{i}.safetensors")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    scaling = arch.configs["vae"].get("scaling_factor", 0.18215)
    vae = {"scaling_factor": scaling, "shift_factor": None, "latent_channels": channels, "flip": False}
    (folder / "vae.json").write_text(json.dumps(vae))
    return folder


def synthetic_embeddings(folder: Path, arch, prompt: str) -> dict[str, Path]:
    """Cached prompt embeddings of the right shapes, as the train stage leaves them for frozen text encoders."""
    import torch
    from safetensors.torch import save_file

    unet = arch.configs["unet"]
    tensors = {"hidden": torch.randn(1, 77, unet["cross_attention_dim"])}
    if unet.get("addition_embed_type") == "text_time":
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        tensors["pooled"] = torch.randn(1, pooled)
    save_file(tensors, folder / "embeds.safetensors")
    return {prompt: folder / "embeds.safetensors"}


def reference_images(latents: Path, side: int) -> Path:
    """A random PNG per synthetic sample, for the reference mode to decode and encode at every draw."""
    import numpy as np
    from PIL import Image

    folder = latents.parent / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for line in (latents / "index.csv").read_text().splitlines()[1:]:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{line.split(',')[0]}.png")
    return folder


def training_for(case: Case | Checkpoint, root: Path, steps: int):
    """The train stage's own training of a case, on synthetic latents (and embeddings), prepared; with its plan."""
    from tasks.core.config import TrainSection
    from tasks.sd.memory import architecture, estimate_train
    from tasks.sd.models import resolve_model
    from tasks.training.build import build_training
    from tasks.training.job import TrainJob, resolved_optimizer

    path = resolve_model(case.preset, root)
    arch = architecture(case.preset, root)
    work = Path(tempfile.mkdtemp(dir=root))
    cfg = TrainSection(**case.settings, steps=steps + 1, checkpoint_every=0)
    job = TrainJob(
        family=arch.family, base=path, out_dir=work / "out", checkpoints_dir=work / "ckpt",
        latents_dir=synthetic_latents(work / "latents", arch, case.resolution), train=cfg,
        optimizer=resolved_optimizer(cfg), instance_prompt=PROMPT, class_prompt=None, prior_weight=0.0,
        text_embeds=None if cfg.train_text_encoder else synthetic_embeddings(work, arch, PROMPT),
        parent_pid=0, facts={},
    )  # fmt: skip
    training = build_training(job)
    training.prepare()
    return training, estimate_train(arch, cfg, case.resolution, prior=False).total / 2**20


def train_case(case: Case, root: Path, steps: int) -> dict:
    """Milliseconds per optimizer step of the train stage's own loop (b), the compute floor (a) and, for a
    reference case, the re-encoding reference (c): each the slope between step 1 and step 1 + `steps` of one run
    (the first step warms the allocator, kernels and compilation), in that order, twice, medians reported."""
    import statistics

    from diffusers import AutoencoderKL
    from train_throughput import ReencodedData, floor_step, per_step

    from tasks.training.step import make_batch, optimizer_step, optimizer_step_on_device

    training, plan = training_for(case, root, steps)
    job = training.job
    device = training.accelerator.device
    losses = []

    def cached(step: int) -> None:
        losses.append(optimizer_step_on_device(training, step))

    fixed = make_batch(training.data, training.objective, job, 0, 0).to(device)
    cached_data = training.data
    modes = {"cached": cached, "floor": floor_step(training, fixed)} | ({"reference": cached} if case.reference else {})
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    synchronize()
    started = time.perf_counter()
    first = optimizer_step(training, 0)  # warm-up: allocator, kernels, compilation
    first_step = time.perf_counter() - started
    peak = None
    for mode in [*modes, *modes]:
        if mode == "reference" and peak is None:
            peak = peak_mib()  # the training loop's own peak, before the reference's VAE joins it
            vae = AutoencoderKL.from_pretrained(job.base / "vae").to(device)  # the preset's own
            reference = ReencodedData(job.latents_dir, reference_images(job.latents_dir, case.resolution), vae)
        training.data = reference if mode == "reference" else cached_data
        times[mode].append(per_step(modes[mode], device, 1, 1 + steps))
    ms = {mode: 1e3 * statistics.median(values) for mode, values in times.items()}
    finite = all(math.isfinite(loss) for loss in [first, *[loss.item() for loss in losses]])
    return {"rate": 1e3 / ms["cached"], "unit": "steps/s", "peak_mib": peak or peak_mib(), "plan_mib": plan, "ms": ms,
            "first_step_s": first_step, "optimizer": job.optimizer, "finite": finite}  # fmt: skip


def checkpoint_case(case: Checkpoint, root: Path, steps: int) -> dict:
    """One checkpoint through the trainer's own writer (in the background on CUDA, as training writes it): how long
    the loop waits for it (the host copy), how long the write takes while `steps` steps go on, whether its host
    buffers are pinned, and whether a fresh training restores exactly the weights and optimizer state saved."""
    import torch

    from tasks.training.build import build_training
    from tasks.training.checkpoints import CheckpointWriter, restore
    from tasks.training.step import optimizer_step, optimizer_step_on_device

    training, plan = training_for(case, root, steps)
    job, cuda = training.job, training.accelerator.device.type == "cuda"
    optimizer_step(training, 0)  # warm-up, and an optimizer state to save
    saved = {name: p.detach().cpu().clone() for name, p in training.params.items()}
    moments = [s["exp_avg"].cpu().clone() for s in training.optimizer.state.values()]
    writer = CheckpointWriter(job, background=cuda)
    synchronize()
    started = time.perf_counter()
    writer.save(1, training.params, training.state, [])
    stall = time.perf_counter() - started
    for step in range(1, 1 + steps):  # the steps go on while the thread writes
        optimizer_step_on_device(training, step)
    synchronize()
    stepped = time.perf_counter()
    writer.wait()
    written = time.perf_counter() - started
    pinned = [buffer.is_pinned() for buffer in writer.staging.buffers.values()]
    fresh = build_training(job)
    restored_step, _ = restore(job, fresh.params, fresh.state)
    same_weights = all(torch.equal(saved[name], p.detach().cpu()) for name, p in fresh.params.items())
    states = fresh.optimizer.state.values()
    same_moments = all(torch.equal(m, s["exp_avg"].cpu()) for m, s in zip(moments, states, strict=True))
    return {"rate": steps / (stepped - started - stall), "unit": "steps/s while writing", "peak_mib": peak_mib(),
            "plan_mib": plan, "stall_ms": 1e3 * stall, "write_s": written, "background": cuda,
            "pinned": bool(pinned) and all(pinned),
            "restored": restored_step == 1 and same_weights and same_moments}  # fmt: skip


def generate_case(case: Render, root: Path) -> dict:
    """Render `batch` images in one call through boothflow's renderer (after a one-step warm-up call)."""
    import torch

    from tasks.sd.memory import architecture, estimate_render
    from tasks.sd.models import ResolvedModel, model_family, resolve_model
    from tasks.sd.render import RenderRequest, load_pipeline_for, make_scheduler, render

    path = resolve_model(case.preset, root)
    dtype = "float16" if torch.cuda.is_available() else "float32"
    pipe = load_pipeline_for(ResolvedModel(case.preset, path, model_family(path), path / "vae", {}), dtype)
    make_scheduler(pipe, "DPMSolverMultistepScheduler")
    side = case.side
    requests = [RenderRequest(PROMPT, "", seed, case.steps, 7.5, side, side) for seed in range(case.batch)]
    list(render(pipe, [RenderRequest("warm-up", "", 0, 1, 7.5, side, side)], 1, "warm-up"))
    synchronize()
    started = time.perf_counter()
    images = [image for _, image in render(pipe, requests, case.batch, "check")]
    synchronize()
    seconds = time.perf_counter() - started
    plan = estimate_render(
        architecture(case.preset, root), "generate", dtype, case.batch, side, 7.5, slicing=True, tiling=False
    )
    return {"rate": len(images) / seconds, "unit": "images/s", "peak_mib": peak_mib(), "plan_mib": plan.total / 2**20,
            "dtype": dtype, "images": len(images)}  # fmt: skip


def in_child(kind: str, spec: dict, root: Path, steps: int, timeout: float) -> dict:
    """Run one case in a fresh process, so each peak is that case's alone."""
    command = [sys.executable, __file__, "--child", json.dumps({"kind": kind, "spec": spec}),
               "--root", str(root), "--steps", str(steps)]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(payload: str, root: Path, steps: int) -> None:
    request = json.loads(payload)
    if request["kind"] == "train":
        result = train_case(Case(**request["spec"]), root, steps)
    elif request["kind"] == "checkpoint":
        result = checkpoint_case(Checkpoint(**request["spec"]), root, steps)
    else:
        result = generate_case(Render(**request["spec"]), root=root)
    result["prefect_imported"] = "prefect" in sys.modules
    print(json.dumps(result))


def run_case(case: Case | Render | Checkpoint, root: Path, steps: int, timeout: float) -> dict:
    if isinstance(case, Render):
        return {"case": case.name, **in_child("generate", asdict(case), root, steps, timeout)}
    if isinstance(case, Checkpoint):
        return {"case": case.name, **in_child("checkpoint", asdict(case), root, steps, timeout)}
    if case.requires and importlib.util.find_spec(case.requires) is None:
        return {"case": case.name, "skipped": f"{case.requires} not installed ({OPTIONAL[case.requires]})"}
    return {"case": case.name, **in_child("train", asdict(case), root, steps, timeout)}


def markdown(rows: list[dict], device: str, command: str) -> list[str]:
    lines = [
        "# GPU check",
        "",
        f"Device: {device}. Command: `{command}` ({time.strftime('%Y-%m-%d')}).",
        "Training: ms per optimizer step, each the slope over the timed steps, median of two interleaved runs.",
        "",
        "| case | rate | peak MiB | plan MiB | plan error | floor (a) ms | cached (b) ms | reference (c) ms |"
        " (b)/(a) | (c)/(b) | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['case']} | | | | | | | | | | {row.get('error') or row.get('skipped')} |")
            continue
        error = 100 * (row["plan_mib"] - row["peak_mib"]) / row["peak_mib"]
        ms = row.get("ms", {})
        times = [f"{ms[mode]:.1f}" if mode in ms else "" for mode in ("floor", "cached", "reference")]
        ratios = [f"{ms[top] / ms[bottom]:.3f}" if top in ms else "" for top, bottom in
                  (("cached", "floor"), ("reference", "cached"))]  # fmt: skip
        notes = ", ".join(f"{k} {row[k]}" for k in ("optimizer", "dtype") if k in row)
        notes += f", first step {row['first_step_s']:.1f} s" if "first_step_s" in row else ""
        if "stall_ms" in row:
            notes += (f"loop waited {row['stall_ms']:.0f} ms, written in {row['write_s']:.1f} s"
                      f"{' in the background' if row['background'] else ''}, pinned {row['pinned']},"
                      f" restored bit for bit {row['restored']}")  # fmt: skip
        lines.append(f"| {row['case']} | {row['rate']:.3f} {row['unit']} | {row['peak_mib']:.0f} |"
                     f" {row['plan_mib']:.0f} | {error:+.0f}% | {' | '.join(times)} | {' | '.join(ratios)} |"
                     f" {notes} |")  # fmt: skip
    return lines


def write_results(out: Path, rows: list[dict], device: str, versions: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "versions": versions, "rows": rows}, indent=1))
    table = markdown(rows, device, " ".join(["python", *sys.argv]))
    (out / "results.md").write_text("\n".join(table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required="--child" not in sys.argv, help="folder for results.json/.md")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, two steps: seconds, runs on a CPU")
    parser.add_argument("--root", type=Path, default=None, help="where presets are built (default: <out>/models)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 5, smoke 2)")
    parser.add_argument("--budget", type=float, default=3600, help="seconds after which no further case starts")
    parser.add_argument("--only", action="append", help="run only the case of this name (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None:
        sys.exit("gpu_check needs torch: install the CUDA build for this machine first")
    missing = missing_packages()
    if missing:
        sys.exit(f"gpu_check needs: pip install {' '.join(missing)}")
    steps = args.steps or (2 if args.smoke else 5)
    if args.child:
        return run_child(args.child, args.root, steps)

    import diffusers
    import torch
    import transformers

    from tasks.sd.models import resolve_model

    deadline = time.monotonic() + args.budget
    root = (args.root or args.out / "artifacts").resolve()
    cases = [case for case in (SMOKE if args.smoke else FULL) if not args.only or case.name in args.only]
    if not cases:
        sys.exit(f"gpu_check: no case is named {', '.join(args.only)}")
    for preset in dict.fromkeys(case.preset for case in cases):  # built once, before the timed children
        resolve_model(preset, root)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA): peaks are RSS"
    versions = {module.__name__: module.__version__ for module in (torch, diffusers, transformers)}
    rows = []
    for case in cases:
        seconds_left = deadline - time.monotonic()
        if seconds_left < 10:
            rows.append({"case": case.name, "skipped": f"not run: the {args.budget:.0f} s budget was spent"})
        else:
            rows.append(run_case(case, root, steps, min(seconds_left, CHILD_LIMIT)))
        print(json.dumps(rows[-1]), flush=True)
        write_results(args.out, rows, device, versions)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
