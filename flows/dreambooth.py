"""The boothflow pipeline as one Prefect flow: which stages run, in which order, with which config.

Every stage is a cached task, so a rerun skips what is done; `dreambooth_stage` runs one stage alone.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.runner import StageRunner
from tasks import preprocess
from tasks.config import RunConfig

STAGES = ["preprocess"]


def pipeline(config: RunConfig, stages: StageRunner) -> None:
    with stages:
        files = preprocess.scan(config.data.instance_dir)
        inputs = preprocess.PreprocessInputs(config.data.instance_dir, files, config.data.min_images)
        stages.run(
            preprocess.preprocess_task,
            config.preprocess,
            inputs,
            preprocess.stage_key_for,
            outputs={"preprocess_dir": "images"},
        )


@flow(name="dreambooth")
def dreambooth(config: RunConfig = RunConfig()) -> dict[str, Any]:  # noqa: B008 - the UI form shows the default
    """DreamBooth fine-tuning of Stable Diffusion, every stage cached by its inputs."""
    stages = StageRunner(config, STAGES)
    pipeline(config, stages)
    return stages.summary


@flow(name="dreambooth-stage")
def dreambooth_stage(config: RunConfig, stage: str) -> dict[str, Any]:
    """Run one stage from cached upstream outputs; names the upstream stage that is missing."""
    stages = StageRunner(config, STAGES, only=stage)
    pipeline(config, stages)
    return stages.summary
