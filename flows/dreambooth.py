"""The boothflow pipeline as one Prefect flow: which stages run, in which order, with which config.

Every stage is a cached task, so a rerun skips what is done; `dreambooth_stage` runs one stage alone.
"""

# No `from __future__ import annotations` here: Prefect builds the flow's parameter model from real annotations,
# and a string `RunConfig` fails to resolve when a deployment loads this file by path.
from typing import Any

from prefect import flow, get_run_logger

from flows.preflight import check_before_start
from flows.publish import publish
from flows.runner import StageRunner, check_concurrency_limit
from flows.workers import on_this_machine, pin_worker_gpu
from tasks.core.config import ConfigError, RunConfig
from tasks.core.photos import PhotosUnreachable, mirror
from tasks.core.stage import StageError, StageResult
from tasks.sd.memory import MemoryPlanError
from tasks.sd.memory_plan import preflight
from tasks.sd.models import ModelUnavailable, ResolvedModel, resolve
from tasks.stages import class_images, evaluate, export, generate, latents, preprocess, report, select, train


def base_model(config: RunConfig, needed_by: str) -> ResolvedModel:
    try:
        model = config.model
        return resolve(model.id, model.vae, config.run.artifacts_root, model.revision, model.vae_revision)
    except (ModelUnavailable, ValueError, OSError) as err:  # unreachable, unsupported or unreadable model
        raise StageError(needed_by, str(err), item=config.model.id) from None


def check_plan(config: RunConfig) -> None:
    """Before any stage: paths, names and pairs (`check_before_start`), the concurrency limit on the server, precision
    the device can run, and the memory plan (when its size is known)."""
    try:
        check_before_start(config)
        check_concurrency_limit(config.run.concurrency_limit)
    except ConfigError as err:
        raise StageError("config", str(err)) from None
    try:
        for warning in preflight(config):
            get_run_logger().warning(warning)
    except MemoryPlanError as err:
        raise StageError("plan", str(err)) from None


def local_photos(config: RunConfig) -> RunConfig:
    """The config with a local instance folder: photos at a URL are mirrored into the artifact root first."""
    url = config.data.instance_dir
    if not isinstance(url, str):
        return config
    try:
        folder = mirror(url, config.run.artifacts_root, config.run.store_options)
    except PhotosUnreachable as err:
        raise StageError("preprocess", str(err)) from None
    return config.model_copy(update={"data": config.data.model_copy(update={"instance_dir": folder})})


def pipeline(config: RunConfig, stages: StageRunner) -> None:
    """The stages in order, each a cached Prefect task: what runs is what the inputs and settings changed."""
    with stages:
        if not stages.plan:
            check_plan(config)
        config = local_photos(config)
        photos = preprocess.PreprocessInputs.of(config)
        stages.summary["waiting"] = list(photos.waiting)
        if photos.waiting and not stages.plan:
            get_run_logger().warning(f"{len(photos.waiting)} instance files were modified in the last "
                                     f"{config.data.settle_minutes:g} minutes (data.settle_minutes) and wait for the "
                                     f"next run: {', '.join(photos.waiting)}")  # fmt: skip
        instance = stages.run(preprocess.stage, photos)
        model = base_model(config, needed_by=config.stage_names()[1])
        classes = None
        if config.prior.enabled:
            classes = stages.run(class_images.stage, class_images.ClassImagesInputs.of(config, model))
        encoded = stages.run(latents.stage, latents.LatentsInputs(model, instance, classes))
        trained = stages.run(train.stage, train.TrainInputs.of(config, model, encoded, instance))
        picked = pick(config, stages, model, instance, trained) if config.train.pick != "last" else None
        stages.run(export.stage, export.ExportInputs.of(config, model, picked or trained))
        generated = stages.run(generate.stage, generate.GenerateInputs.of(config, model, picked or trained))
        scored = stages.run(evaluate.stage, evaluate.EvaluateInputs.of(config, instance, generated))
        results = (instance, classes, trained, generated, scored)
        stages.run(report.stage, report.ReportInputs.of(config, stages.summary["stages"], *results, selection=picked,
                                                        waiting=photos.waiting))  # fmt: skip


def pick(config: RunConfig, stages: StageRunner, model: ResolvedModel, instance: StageResult, trained: StageResult):
    """`train.pick = best:<metric>`: render the validation prompts x seeds from every kept step and the final weights,
    score them, and keep the best; export and generate then read the pick."""
    view = generate.validation_view(config.generate)
    checked = stages.run(generate.stage, generate.GenerateInputs.of(config, model, trained), "validate", view)
    steps_scored = stages.run(evaluate.stage, evaluate.EvaluateInputs.of(config, instance, checked), "score")
    return stages.run(select.stage, select.SelectInputs(trained, steps_scored))


def planned_keys(config: RunConfig) -> dict[str, dict]:
    """Each stage's key and cache status for this config, computed by the pipeline itself without running it."""
    stages = StageRunner(config, config.stage_names(), plan=True)
    pipeline(config, stages)
    return stages.summary["stages"]


def run_and_publish(config: RunConfig, stages: StageRunner) -> dict[str, Any]:
    """The pipeline, then its artifacts in the UI, failed or not; a failure to publish never hides a stage's own."""
    try:
        pipeline(config, stages)
    except BaseException:
        try:
            publish(stages.summary, config.run.artifacts_root)
        except Exception as err:
            get_run_logger().warning(f"the run's artifacts were not published: {type(err).__name__}: {err}")
        raise
    publish(stages.summary, config.run.artifacts_root)
    return stages.summary


@flow(name="dreambooth")
def dreambooth(config: RunConfig = RunConfig()) -> dict[str, Any]:  # noqa: B008 - the UI form shows the default
    """DreamBooth fine-tuning of Stable Diffusion, every stage cached by its inputs."""
    pin_worker_gpu()  # on a `boothflow worker`: that worker's GPU, before anything touches CUDA
    config = on_this_machine(config)
    return run_and_publish(config, StageRunner(config, config.stage_names()))


@flow(name="dreambooth-stage")
def dreambooth_stage(config: RunConfig, stage: str) -> dict[str, Any]:
    """Run one stage from cached upstream outputs; names the upstream stage that is missing."""
    pin_worker_gpu()
    config = on_this_machine(config)
    return run_and_publish(config, StageRunner(config, config.stage_names(), only=stage))
