"""Generation throughput: images/s at batch 1 and at the configured batch (`generate.batch_size`), and the load
time one base pipeline wearing each set of weights in turn saves over a fresh pipeline per set (as before).

Runs the demo (tiny-sd15) and toy (toy-sd) configs as they are, through the generate stage's own pipeline and
renderer. The weight sets (base, each `train.sample_every` step, final) are the base's own weights saved in the
train stage's layout: a load costs what a trained model's costs; what they render is not measured here.
Usage: .venv/bin/python benchmarks/generate_throughput.py [--quick] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from results import write_section

from tasks.core.config import RunConfig, fill_prompt
from tasks.core.config_load import load_config
from tasks.core.stage import StageResult
from tasks.core.tables import read_json
from tasks.sd.device import release
from tasks.sd.layout import WEIGHTS_DIR
from tasks.sd.models import ResolvedModel, resolve
from tasks.sd.render import RenderRequest, render
from tasks.stages import generate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny-sd15": "configs/demo.toml", "toy-sd": "configs/toy.toml"}
QUICK = ["generate.steps=1", "generate.batch_size=2"]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_output(config: RunConfig, model: ResolvedModel, folder: Path) -> StageResult:
    """A full fine-tune's train output holding the base's weights: the UNet (and text encoder, when trained) of the
    final weights and of every sample step."""
    pipe = DiffusionPipeline.from_pretrained(model.path)
    train = config.train
    steps = [step for step in range(1, train.steps) if train.sample_every and step % train.sample_every == 0]
    for weights in [folder / WEIGHTS_DIR, *(folder / "samples" / f"step-{step:06d}" for step in steps)]:
        pipe.unet.save_pretrained(weights / "unet", safe_serialization=True)
        if train.train_text_encoder:
            pipe.text_encoder.save_pretrained(weights / "text_encoder", safe_serialization=True)
    training = {"family": model.family, "method": "full", "steps": train.steps, "sample_steps": steps}
    (folder / "training.json").write_text(json.dumps(training))
    return StageResult("train", "benchmark", folder)


def first_items(config: RunConfig, inputs: generate.GenerateInputs) -> dict[str, generate.Item]:
    """The first image of every set of weights the generate stage renders, by set, in render order."""
    firsts: dict[str, generate.Item] = {}
    training = read_json(inputs.train.path / "training.json", "train", "generate")
    for item in generate.plan(config.generate, inputs, training):
        firsts.setdefault(item.weights.name, item)
    return dict(sorted(firsts.items(), key=lambda named: generate.RENDER_ORDER[named[1].weights.kind]))


def load_seconds(config: RunConfig, inputs: generate.GenerateInputs, shared: bool) -> tuple[float, int]:
    """Seconds to put every set of weights on a pipeline in render order: one base pipeline wearing each in turn
    (`shared`), or a fresh pipeline per set (the final model then loads as its own pipeline); and how many whole
    pipelines that loaded (the rest of the loads swap weights in)."""
    release()
    started = time.perf_counter()
    pipeline, loaded = generate.SharedPipeline(config.generate, inputs.model, "full"), []
    for item in first_items(config, inputs).values():
        if not shared:
            loaded += pipeline.loads
            pipeline = generate.SharedPipeline(config.generate, inputs.model, "full")
        pipeline.wearing(item.weights, item)
    synchronize()
    seconds = time.perf_counter() - started
    return seconds, sum("pipeline:" in load for load in [*loaded, *pipeline.loads])


def images_per_second(pipe: DiffusionPipeline, requests: list[RenderRequest], batch: int) -> float:
    synchronize()
    started = time.perf_counter()
    count = sum(1 for _ in render(pipe, requests, batch, f"batch {batch}"))
    synchronize()
    return count / (time.perf_counter() - started)


def measure(model_id: str, work: Path, reps: int, overrides: list[str]) -> dict:
    config = load_config(REPO / CONFIGS[model_id], ["generate.compare_base=true", *overrides], work / "artifacts")
    model = resolve(config.model.id, config.model.vae, config.run.artifacts_root)
    trained = train_output(config, model, work / model_id)
    data, cfg = config.data, config.generate
    inputs = generate.GenerateInputs(model, trained, data.token, data.class_name, config.preprocess.resolution)
    side = cfg.size or inputs.resolution

    load_seconds(config, inputs, shared=False)  # warm-up: every file read once, so both strategies read from cache
    loads, pipelines = {"shared": [], "per set": []}, {}
    for _ in range(reps):  # interleaved, so a change in the machine's load touches both alike
        for strategy in ("per set", "shared"):
            seconds, pipelines[strategy] = load_seconds(config, inputs, shared=strategy == "shared")
            loads[strategy].append(seconds)

    sets = first_items(config, inputs)
    pipe = generate.SharedPipeline(cfg, model, "full").wearing(sets["base"].weights, sets["base"])
    prompt = fill_prompt(cfg.prompts[0], data.token, data.class_name)
    requests = [RenderRequest(prompt, cfg.negative_prompt, seed, cfg.steps, cfg.guidance, side, side)
                for seed in range(cfg.batch_size)]  # fmt: skip
    list(render(pipe, requests[:1], 1, "warm-up"))
    rates: dict[int, list[float]] = {1: [], cfg.batch_size: []}
    for _ in range(reps):
        for batch in rates:
            rates[batch].append(images_per_second(pipe, requests, batch))
    return {"model": model_id, "config": CONFIGS[model_id], "size": side, "steps": cfg.steps, "images": len(requests),
            "batch": cfg.batch_size, "sets": len(sets), "rates": rates, "loads": loads,
            "pipelines": pipelines}  # fmt: skip


def write_results(rows: list[dict], out: Path, command: str, load: str) -> None:
    lines = [
        "# Generation throughput",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}, "
        f"load before the run {load}.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Medians over interleaved repetitions; every rate renders "
        "the same images (one prompt, a seed each) through the generate stage's renderer.",
        "",
        "| model | config | px | steps | images | images/s batch 1 | batch | images/s at batch | speed-up "
        "| weight sets | load s, one base pipeline | load s, one per set | saved s | saved |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        one, batched = (statistics.median(r["rates"][b]) for b in (1, r["batch"]))
        shared, per_set = (statistics.median(r["loads"][k]) for k in ("shared", "per set"))
        cells = [r["model"], f"`{r['config']}`", r["size"], r["steps"], r["images"], f"{one:.2f}", r["batch"],
                 f"{batched:.2f}", f"{batched / one:.2f}x", r["sets"], f"{shared:.2f}", f"{per_set:.2f}",
                 f"{per_set - shared:.2f}", f"{1 - shared / per_set:.0%}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Whole pipelines loaded to put every set of weights on once (the other loads swap weights in):", ""]
    for r in rows:
        lines.append(f"- {r['model']}: {r['pipelines']['shared']} with one base pipeline, "
                     f"{r['pipelines']['per set']} with one per set")  # fmt: skip
    lines += ["", "Every repetition:", ""]
    for r in rows:
        for batch, values in r["rates"].items():
            lines.append(f"- {r['model']} images/s at batch {batch}: " + ", ".join(f"{v:.2f}" for v in values))
        for strategy, values in r["loads"].items():
            lines.append(f"- {r['model']} load s, {strategy}: " + ", ".join(f"{v:.2f}" for v in values))
    write_section("generate_throughput", lines, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny-sd15, one step, batch 2, one repetition: seconds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.models, args.reps = ["tiny-sd15"], 1
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, Path(tmp) / model, args.reps, QUICK if args.quick else []) for model in args.models]
    write_results(rows, args.out, " ".join(["python", *sys.argv]), load)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
