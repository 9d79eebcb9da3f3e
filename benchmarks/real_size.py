"""Full-size SD 1.5 and SDXL on this machine, through the real stages: two optimizer steps each, the exports
reloaded in separate processes, and every measured peak beside the memory plan's estimate.

Run by hand with nothing else running (SD 1.5 peaks near 17 GiB, SDXL near 14 GiB); never in the suite:
    .venv/bin/python benchmarks/real_size.py [--artifacts DIR] [--only sd15-arch|sdxl-arch] [--out RESULTS.md]
`--quick` runs the same path on the tiny presets at 64 px, its checks in this process (seconds); the suite runs it so
the script never rots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import RESULTS, write_section

from tasks.core.config import RunConfig, fill_prompt
from tasks.core.config_load import load_config
from tasks.core.faults import ENV as FAULTS_ENV
from tasks.core.store import Store
from tasks.core.values import GIB
from tasks.sd.layout import KOHYA_FILE, MODEL_DIR, SINGLE_FILE, WEIGHTS_DIR
from tasks.sd.memory import architecture, estimate_render, estimate_train
from tasks.sd.models import resolve
from tasks.stages import export, generate, latents, preprocess, train

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    f"data.instance_dir='{REPO / 'data' / 'demo'}'",
    "preprocess.resolution=512",
    "train.steps=2",
    "train.batch_size=1",
    "train.grad_accum=1",
    "train.gradient_checkpointing=true",
    "train.checkpoint_every=0",
    "train.cpu_threads=2",
    "generate.prompts=['a photo of {token} {class}']",
    "generate.seeds=[0]",
    "generate.steps=2",
    "generate.batch_size=1",
]
CASES = {
    "sd15-arch": ["model.id='sd15-arch'", "train.method='full'", "train.train_text_encoder=true",
                  "train.mixed_precision='no'"],
    "sd15-arch, no checkpointing": ["model.id='sd15-arch'", "train.method='full'", "train.train_text_encoder=true",
                                    "train.mixed_precision='no'", "train.gradient_checkpointing=false"],
    "sdxl-arch": ["model.id='sdxl-arch'", "train.method='lora'", "train.train_text_encoder=false",
                  "train.mixed_precision='bf16'", "train.learning_rate=1e-4"],
}  # fmt: skip
QUICK = {"sd15-arch": "tiny-sd15", "sdxl-arch": "tiny-sdxl"}  # the same families, tiny, at 64 px
VARIANTS = {  # export settings whose disk per subject is measured beside the defaults
    "no single file": {"single_file": False},
    "float16": {"dtype": "float16"},
    "float16, no single file": {"dtype": "float16", "single_file": False},
}


def config(case: str, root: Path, quick: bool = False) -> RunConfig:
    tiny = [f"model.id='{QUICK[case]}'", "preprocess.resolution=64", "preprocess.min_side=64"] if quick else []
    return load_config(None, [*COMMON, *CASES[case], *tiny], root)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stages(cfg: RunConfig, store: Store) -> tuple:
    """Preprocess, latents and train through the stages' own functions (cached after the first call)."""
    data = cfg.data
    model = resolve(cfg.model.id, cfg.model.vae, cfg.run.artifacts_root)
    files = preprocess.scan(data.instance_dir)
    images = preprocess.run(cfg.preprocess, preprocess.PreprocessInputs(data.instance_dir, files, 3), store)
    encoded = latents.run(cfg.latents, latents.LatentsInputs(model, images, None), store)
    prompt = fill_prompt(data.instance_prompt, data.token, data.class_name)
    inputs = train.TrainInputs(model, encoded, prompt, None, 0.0)
    return model, train.run(cfg.train, inputs, store)


def child(args: list[str], quick: bool) -> dict:
    """Run this script's `args` in a fresh process, so the peak is the check's own; its last stdout line is JSON.
    Quick mode runs the check in this process: there, process starts would be most of the time."""
    if quick:
        return check(parser().parse_args([*args, "--quick"]))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generate_child(case: str, root: Path, quick: bool) -> dict:
    """Render one image from the trained model in this (fresh) process and report its peak memory."""
    cfg = config(case, root, quick)
    store = Store(root)
    model, trained = stages(cfg, store)
    started = time.monotonic()
    side = cfg.preprocess.resolution
    inputs = generate.GenerateInputs(model, trained, cfg.data.token, cfg.data.class_name, side)
    generate.run(cfg.generate, inputs, store)
    return {"peak_mib": peak_rss_mib(), "seconds": time.monotonic() - started}


def reload_sd15(model: Path) -> dict:
    """The single-file checkpoint loads through from_single_file with the pipeline folder's exact weights."""
    from diffusers import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(model)
    single = StableDiffusionPipeline.from_single_file(
        str(model / SINGLE_FILE), config=str(model), local_files_only=True
    )
    equal = {}
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        equal[name] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"equal": equal, "peak_mib": peak_rss_mib()}


def fuse_sdxl(model: Path, base: Path, trained: Path) -> dict:
    """The kohya file loads with load_lora_weights and fuses to base + B @ A of the trained adapters."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    adapters = load_file(trained)
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(model, weight_name=KOHYA_FILE)
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    expected = {
        name: layer.base_layer.weight.detach()
        + adapters[f"unet.{name}.lora_B.default.weight"] @ adapters[f"unet.{name}.lora_A.default.weight"]
        for name, layer in layers.items()
    }
    update = max((w - layers[n].base_layer.weight.detach()).abs().max().item() for n, w in expected.items())
    pipe.fuse_lora(components=["unet"])
    error = max((layers[n].base_layer.weight.detach() - w).abs().max().item() for n, w in expected.items())
    return {"layers": len(layers), "max_update": update, "max_abs_error": error, "peak_mib": peak_rss_mib()}


def measure(case: str, root: Path, quick: bool) -> dict:
    cfg = config(case, root, quick)
    store = Store(root)
    started = time.monotonic()
    resolve(cfg.model.id, "", root)
    built = time.monotonic() - started
    dump = root / f"{case}-trainable.safetensors"  # the trained LoRA adapters, for the fuse check
    if cfg.train.method == "lora":
        faults = root / f"{case}-faults.json"
        faults.write_text(json.dumps({"save_trainable_to": str(dump)}))
        os.environ[FAULTS_ENV] = str(faults)
    started = time.monotonic()
    model, trained = stages(cfg, store)
    os.environ.pop(FAULTS_ENV, None)
    train_seconds = time.monotonic() - started
    started = time.monotonic()
    exported = export.run(cfg.export, export.ExportInputs(model, trained, cfg.model.safety_checker), store)
    export_seconds, model_dir = time.monotonic() - started, exported.path / MODEL_DIR
    variants = {}  # a full fine-tune's disk under other export settings, from the same training
    for name, update in (VARIANTS if cfg.train.method == "full" else {}).items():
        other = export.run(cfg.export.model_copy(update=update), export.ExportInputs(model, trained, False), store)
        variants[name] = disk_per_subject(model.path, trained.path, other.path)["disk_after"]
    memory = json.loads((trained.path / "memory.json").read_text())["peak_mib"]
    metrics = (trained.path / "metrics.csv").read_text().splitlines()[1:]
    arch = architecture(cfg.model.id, root)
    side, gen = cfg.preprocess.resolution, cfg.generate
    plan = estimate_train(arch, cfg.train, side, prior=False)
    # The optimizer step's scratch is CUDA's multi-tensor AdamW; on a CPU AdamW steps one tensor at a time.
    plan_train = (plan.total - (0 if torch.cuda.is_available() else plan.parts["optimizer step"])) / 2**20
    plan_generate = (
        estimate_render(arch, "generate", gen.dtype, 1, side, gen.guidance, True, gen.vae_tiling).total / 2**20
    )
    generated = child(["--generate-child", case, str(root)], quick)
    if cfg.train.method == "full":
        checked = child(["--reload-sd15", str(model_dir)], quick)
        verdict = f"from_single_file == diffusers folder: {checked['equal']}"
    else:
        base = arch and resolve(cfg.model.id, "", root).path
        checked = child(["--fuse-sdxl", str(model_dir), str(base), str(dump)], quick)
        verdict = (f"kohya file fused on {checked['layers']} layers: largest trained change "
                   f"{checked['max_update']:.2e}, largest difference from base + B @ A "
                   f"{checked['max_abs_error']:.2e}")  # fmt: skip
    return {
        "case": case, "built_s": built, "train_s": train_seconds, "steps": metrics,
        "train_peak": memory["train"], "export_peak": memory["export"], "plan_train": plan_train,
        "generate_peak": generated["peak_mib"], "generate_s": generated["seconds"], "plan_generate": plan_generate,
        "check_peak": checked["peak_mib"], "verdict": verdict, "export_s": export_seconds,
        **disk_per_subject(model.path, trained.path, exported.path), "disk_variants": variants,
    }  # fmt: skip


def _files(folder: Path) -> list[os.stat_result]:
    return [f.stat() for f in folder.rglob("*") if f.is_file() and not f.is_symlink()]


def disk_per_subject(base: Path, train_entry: Path, export_entry: Path) -> dict[str, int]:
    """What one subject's training and export take on disk beyond the base model, as du counts it (a file with several
    links once; none that is a link to a base model file), and what the same model took when training wrote the
    formats itself: the train entry without its weights folder plus every file of the model folder, linked or not
    (the export writes the same components in the same formats the train entry held)."""
    seen = {stat.st_ino for stat in _files(base)}
    after = 0
    for stat in (*_files(train_entry), *_files(export_entry)):
        if stat.st_ino not in seen:
            seen.add(stat.st_ino)
            after += stat.st_size
    apparent = [sum(s.st_size for s in _files(folder)) for folder in (train_entry, train_entry / WEIGHTS_DIR)]
    before = apparent[0] - apparent[1] + sum(s.st_size for s in _files(export_entry / MODEL_DIR))
    return {"disk_before": before, "disk_after": after}


def report(rows: list[dict]) -> list[str]:
    def error(measured: float, planned: float) -> str:
        return f"{100 * (planned - measured) / measured:+.0f}%"

    def disk(row: dict) -> str:
        if "disk_after" not in row:
            return "| not measured"
        others = "; ".join(f"{name}: {size / 2**20:,.0f}" for name, size in row.get("disk_variants", {}).items())
        after = f"{row['disk_before'] / 2**20:,.0f} → {row['disk_after'] / 2**20:,.0f}"
        return f"{row['export_s']:.0f} | {after}{f' ({others})' if others else ''}"

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    lines = [
        "# Real size (full-size architectures, random weights, CPU)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, {memory / GIB:.0f} GiB, torch {torch.__version__}.",
        "Command: `python benchmarks/real_size.py` (each row says when and how it was run last).",
        "Each case: data/demo at 512 px, 2 optimizer steps of batch 1 through the train stage (its `accelerate launch`",
        "child), gradient checkpointing; sd15-arch: full UNet + text encoder, fp32, AdamW; sdxl-arch: UNet LoRA",
        "rank 4, bf16 autocast, frozen UNet in bf16. Peaks are each process's resident-set high-water mark (MiB);",
        "the plan estimates accelerator memory, with 1 GiB for the runtime (here: Python, torch and libraries), less",
        "the optimizer step's scratch that only CUDA's multi-tensor AdamW takes. Disk per subject: the train and",
        "export entries beyond the base model (MiB, du's count: links once), before exports were a stage (training",
        "wrote every component and the single file itself) and after, with the default export settings (float32 and",
        "the single file) and in brackets others, exported from the same training; the export stage's time beside it.",
        "",
        "| case | build s | train stage s | step losses | train peak | plan | error | after export | generate 1 image peak | plan | error | export s | disk per subject before → after | export check |",  # noqa: E501
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        losses = ", ".join(f"{float(line.split(',')[1]):.4f}" for line in r["steps"])
        lines.append(
            f"| {r['case']} | {r['built_s']:.0f} | {r['train_s']:.0f} | {losses} | {r['train_peak']:.0f} |"
            f" {r['plan_train']:.0f} | {error(r['train_peak'], r['plan_train'])} | {r['export_peak']:.0f} |"
            f" {r['generate_peak']:.0f} | {r['plan_generate']:.0f} | {error(r['generate_peak'], r['plan_generate'])} |"
            f" {disk(r)} | {r['verdict']} (process peak {r['check_peak']:.0f}); `{r['command']}`, {r['date']} |"
        )
    return lines


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default: a temporary folder)")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only this case (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="the tiny presets at 64 px instead (seconds)")
    parser.add_argument("--generate-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--reload-sd15", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fuse-sdxl", nargs=3, type=Path, help=argparse.SUPPRESS)
    return parser


def check(args: argparse.Namespace) -> dict | None:
    """The check a child process was started for, if any."""
    if args.generate_child:
        return generate_child(args.generate_child[0], Path(args.generate_child[1]), args.quick)
    if args.reload_sd15:
        return reload_sd15(args.reload_sd15)
    if args.fuse_sdxl:
        return fuse_sdxl(*args.fuse_sdxl)
    return None


def main() -> None:
    args = parser().parse_args()
    result = check(args)
    if result is not None:
        print(json.dumps(result))
        return
    root = (args.artifacts or Path(tempfile.mkdtemp(prefix="real-size-"))).resolve()
    measured = args.out.with_name("real_size.json")  # every case's latest figures; --only replaces some
    rows = json.loads(measured.read_text()) if measured.is_file() else {}
    for case in args.only or (QUICK if args.quick else CASES):
        print(f"{case}: building, training 2 steps, reloading (minutes)...", flush=True)
        command = " ".join(["python", *sys.argv])
        rows[case] = measure(case, root, args.quick) | {"command": command, "date": time.strftime("%F")}
        print(json.dumps(rows[case]), flush=True)
        measured.write_text(json.dumps(rows, indent=1))
    write_section("real_size", report([rows[case] for case in CASES if case in rows]), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
