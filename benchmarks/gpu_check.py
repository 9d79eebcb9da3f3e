"""The GPU check: training steps/s, rendering images/s and peak CUDA memory of the full-size presets, one setting
toggled at a time, each beside the memory plan's estimate. It imports no Prefect, and on a bare CUDA machine with
Python and torch it names the packages it still needs. Each case runs in its own process (a clean peak).

    python benchmarks/gpu_check.py --out DIR           # 10 cases on sd15-arch and sdxl-arch (one large GPU: minutes)
    python benchmarks/gpu_check.py --smoke --out DIR   # the tiny presets, seconds; the suite runs it on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


FULL = [
    Case("sd15 fp32", "sd15-arch", 512, SD15),
    Case("sd15 fp16", "sd15-arch", 512, SD15 | {"mixed_precision": "fp16"}),
    Case("sd15 bf16", "sd15-arch", 512, SD15 | {"mixed_precision": "bf16"}),
    Case("sd15 checkpointing", "sd15-arch", 512, SD15 | {"gradient_checkpointing": True}),
    Case("sd15 8-bit Adam", "sd15-arch", 512, SD15 | {"optimizer": "adamw8bit"}, requires="bitsandbytes"),
    Case("sd15 xformers", "sd15-arch", 512, SD15 | {"attention": "xformers"}, requires="xformers"),
    Case("sd15 torch.compile", "sd15-arch", 512, SD15 | {"compile_unet": True}),
    Case("sd15 channels-last", "sd15-arch", 512, SD15 | {"channels_last": True}),
    Case("sd15 fp32 without TF32", "sd15-arch", 512, SD15 | {"tf32": False}),
    Case("sdxl fp32", "sdxl-arch", 1024, SDXL),
    Case("sdxl bf16", "sdxl-arch", 1024, SDXL | {"mixed_precision": "bf16"}),
    Case("sdxl checkpointing", "sdxl-arch", 1024, SDXL | {"gradient_checkpointing": True}),
]
SMOKE = [Case("sd15 fp32", "tiny-sd15", 64, SD15), Case("sdxl fp32", "tiny-sdxl", 64, SDXL)]


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


def train_case(case: Case, root: Path, steps: int) -> dict:
    """`steps` timed optimizer steps of the real training loop (after one warm-up step), in this process."""

    from tasks.core.config import TrainSection
    from tasks.sd.memory import architecture, estimate_train
    from tasks.sd.models import resolve_model
    from tasks.stages.train_job import TrainJob, resolved_optimizer
    from tasks.stages.trainer import build_training, optimizer_step

    path = resolve_model(case.preset, root)
    arch = architecture(case.preset, root)
    work = Path(tempfile.mkdtemp(dir=root))
    cfg = TrainSection(**case.settings, steps=steps + 1, checkpoint_every=0)
    job = TrainJob(
        family=arch.family, base=path, vae_path=path / "vae", out_dir=work / "out", checkpoints_dir=work / "ckpt",
        latents_dir=synthetic_latents(work / "latents", arch, case.resolution), train=cfg,
        optimizer=resolved_optimizer(cfg), instance_prompt=PROMPT, class_prompt=None, prior_weight=0.0,
        text_embeds=None if cfg.train_text_encoder else synthetic_embeddings(work, arch, PROMPT), safety_checker=False,
        parent_pid=0, facts={},
    )  # fmt: skip
    training = build_training(job)
    training.prepare()
    optimizer_step(training, 0)  # warm-up: allocator, kernels, compilation
    synchronize()
    started = time.perf_counter()
    losses = [optimizer_step(training, step) for step in range(1, steps + 1)]
    synchronize()
    seconds = time.perf_counter() - started
    plan = estimate_train(arch, cfg, case.resolution, prior=False).total / 2**20
    return {"rate": steps / seconds, "unit": "steps/s", "peak_mib": peak_mib(), "plan_mib": plan,
            "optimizer": job.optimizer, "finite": all(loss == loss for loss in losses)}  # fmt: skip


def generate_case(preset: str, side: int, batch: int, steps: int, root: Path) -> dict:
    """Render `batch` images in one call through boothflow's renderer (after a one-step warm-up call)."""
    import torch

    from tasks.sd.memory import architecture, estimate_render
    from tasks.sd.models import ResolvedModel, model_family, resolve_model
    from tasks.sd.render import RenderRequest, load_pipeline_for, make_scheduler, render

    path = resolve_model(preset, root)
    dtype = "float16" if torch.cuda.is_available() else "float32"
    pipe = load_pipeline_for(ResolvedModel(preset, path, model_family(path), path / "vae", {}), dtype)
    make_scheduler(pipe, "DPMSolverMultistepScheduler")
    requests = [RenderRequest("a photo of sks dog", "", seed, steps, 7.5, side, side) for seed in range(batch)]
    list(render(pipe, [RenderRequest("warm-up", "", 0, 1, 7.5, side, side)], 1, "warm-up"))
    synchronize()
    started = time.perf_counter()
    images = [image for _, image in render(pipe, requests, batch, "check")]
    synchronize()
    seconds = time.perf_counter() - started
    plan = estimate_render(architecture(preset, root), "generate", dtype, batch, side, 7.5, slicing=True, tiling=False)
    return {"rate": len(images) / seconds, "unit": "images/s", "peak_mib": peak_mib(), "plan_mib": plan.total / 2**20,
            "dtype": dtype}  # fmt: skip


def in_child(kind: str, spec: dict, root: Path, steps: int) -> dict:
    """Run one case in a fresh process, so each peak is that case's alone."""
    command = [sys.executable, __file__, "--child", json.dumps({"kind": kind, "spec": spec}),
               "--root", str(root), "--steps", str(steps)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(payload: str, root: Path, steps: int) -> None:
    request = json.loads(payload)
    if request["kind"] == "train":
        result = train_case(Case(**request["spec"]), root, steps)
    else:
        result = generate_case(**request["spec"], root=root)
    result["prefect_imported"] = "prefect" in sys.modules
    print(json.dumps(result))


def markdown(rows: list[dict], device: str, command: str) -> list[str]:
    lines = [
        "# GPU check",
        "",
        f"Device: {device}. Command: `{command}` ({time.strftime('%Y-%m-%d')}).",
        "",
        "| case | rate | peak MiB | plan MiB | plan error | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['case']} | | | | | {row.get('error') or row.get('skipped')} |")
            continue
        error = 100 * (row["plan_mib"] - row["peak_mib"]) / row["peak_mib"]
        notes = ", ".join(f"{k} {row[k]}" for k in ("optimizer", "dtype") if k in row)
        lines.append(f"| {row['case']} | {row['rate']:.3f} {row['unit']} | {row['peak_mib']:.0f} |"
                     f" {row['plan_mib']:.0f} | {error:+.0f}% | {notes} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required="--child" not in sys.argv, help="folder for results.json/.md")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, two steps: seconds, runs on a CPU")
    parser.add_argument("--root", type=Path, default=None, help="where presets are built (default: <out>/models)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 5, smoke 2)")
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

    import torch

    from tasks.sd.models import resolve_model

    root = (args.root or args.out / "artifacts").resolve()
    cases = SMOKE if args.smoke else FULL
    for preset in dict.fromkeys(case.preset for case in cases):  # built once, before the timed children
        resolve_model(preset, root)
    rows = []
    for case in cases:
        if case.requires and importlib.util.find_spec(case.requires) is None:
            rows.append({"case": case.name, "skipped": f"{case.requires} not installed ({OPTIONAL[case.requires]})"})
        else:
            rows.append({"case": case.name, **in_child("train", asdict(case), root, steps)})
        print(json.dumps(rows[-1]), flush=True)
    for preset, side in dict.fromkeys((case.preset, case.resolution) for case in cases):
        for batch in (1, 2) if args.smoke else (1, 4):
            spec = {"preset": preset, "side": side, "batch": batch, "steps": 2 if args.smoke else 20}
            rows.append({"case": f"{preset} generate batch {batch}", **in_child("generate", spec, root, steps)})
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA): peaks are RSS"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    table = markdown(rows, device, " ".join(["python", *sys.argv]))
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
