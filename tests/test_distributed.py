"""Training under accelerate with several processes, on CPU with gloo: 2 processes x batch 1 train as 1 process x
batch 2 (same draws, same key; only the order of float reductions differs), a killed 2-process run resumes bit for
bit, and the user's own accelerate config never reaches a launch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import INSTANCE_PROMPT, _encoded, _images, _train

from tasks.core.config import TrainSection
from tasks.core.stage import StageError
from tasks.stages import train

pytestmark = pytest.mark.training

# DDP averages the two ranks' gradients of batch-1 losses where one process differentiates the batch-2 mean: the
# same sums in another order, so only float32 rounding (~1e-7 relative) differs. Losses keep that scale. AdamW
# divides each gradient by its own running size, so for a weight whose gradient nearly cancels, rounding noise moves
# its update by up to the learning rate per step (measured: at most 1.05e-5 with lr 1e-3 over 3 steps); a tenth of
# the learning rate is 10x that and well below what an unsynchronised process would change (~lr per step).
# Which weight nearly cancels depends on the data to its last bit: the module's latents are encoded with two torch
# threads, as they were when the bound was measured (encoded with one, one weight of 55,296 moved 1.02e-4).
LOSS_RTOL, WEIGHT_ATOL_PER_LR = 1e-5, 0.1
CASES = {"tiny-sd15": {"method": "full"}, "tiny-sdxl": {"method": "lora", "learning_rate": 1e-2}}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four images, encoded by each case's preset with two torch threads (see WEIGHT_ATOL_PER_LR): every test's
    `_encoded` then finds these latents in the module's store."""
    root = tmp_path_factory.mktemp("distributed")
    _images(root / "images", count=4)
    with torch_threads(2):
        for model_id in CASES:
            _encoded(root, model_id, root / "images")
    return root


def _settings(model_id: str, **overrides) -> TrainSection:
    base = {"train_text_encoder": True, "steps": 3, "learning_rate": 1e-3, "checkpoint_every": 0, "cpu_threads": 1}
    return TrainSection(**(base | CASES[model_id] | overrides))


def _losses(result) -> list[float]:
    return [float(row.split(",")[1]) for row in (result.path / "metrics.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("model_id", CASES)
def test_two_processes_of_batch_1_train_as_one_process_of_batch_2(
    workspace: Path, tmp_path: Path, monkeypatch, model_id: str
) -> None:
    model, _, lat = _encoded(workspace, model_id, workspace / "images")
    single, double = _settings(model_id, batch_size=2), _settings(model_id, batch_size=1, num_processes=2)
    lr = single.learning_rate
    inputs = train.TrainInputs(model, lat, INSTANCE_PROMPT, None, 0.0)
    assert train.stage_key_for(single, inputs) == train.stage_key_for(double, inputs)  # the same training

    runs = {}
    for name, cfg in (("single", single), ("double", double)):
        dump = tmp_path / f"{name}.safetensors"
        result = _train(tmp_path / name, model, lat, cfg, monkeypatch, {"save_trainable_to": str(dump)})
        runs[name] = (result, load_file(dump))
    (one, one_weights), (two, two_weights) = runs["single"], runs["double"]
    assert json.loads((two.path / "training.json").read_text())["num_processes"] == 2
    assert _losses(one) == pytest.approx(_losses(two), rel=LOSS_RTOL)
    assert one_weights.keys() == two_weights.keys() and len(one_weights) > 10
    assert any(name.startswith("text_encoder") for name in one_weights)  # encoders are synchronised too
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=WEIGHT_ATOL_PER_LR * lr)


@pytest.fixture(scope="module")
def straight(workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 2-process run with checkpoints: the reference for resume and for the hostile config."""
    model, _, lat = _encoded(workspace, "tiny-sd15", workspace / "images")
    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = _train(root, model, lat, _checkpointed(), monkeypatch, {"save_trainable_to": str(root / "w.st")})
    return model, lat, result, load_file(root / "w.st")


def _checkpointed() -> TrainSection:
    return _settings("tiny-sd15", steps=5, checkpoint_every=2, num_processes=2, train_text_encoder=False)


def test_a_killed_two_process_run_resumes_bit_for_bit(straight, tmp_path: Path, monkeypatch) -> None:
    model, lat, reference, weights = straight
    cfg = _checkpointed()
    with pytest.raises(StageError) as killed:
        _train(tmp_path, model, lat, cfg, monkeypatch, {"kill_train_after_step": 3})
    assert "exited with code" in killed.value.message
    resumed = _train(tmp_path, model, lat, cfg, monkeypatch, {"save_trainable_to": str(tmp_path / "w.st")})
    assert (resumed.items_processed, resumed.items_cached) == (3, 2)
    again = load_file(tmp_path / "w.st")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert _losses(resumed) == _losses(reference)


def test_resuming_with_another_process_count_is_refused_in_one_line(straight, tmp_path: Path, monkeypatch) -> None:
    model, lat, _, _ = straight
    cfg = _checkpointed()
    with pytest.raises(StageError):
        _train(tmp_path, model, lat, cfg, monkeypatch, {"kill_train_after_step": 3})
    other = cfg.model_copy(update={"num_processes": 1, "batch_size": 2})  # the same key: same global batch
    with pytest.raises(StageError) as refused:
        _train(tmp_path, model, lat, other, monkeypatch)
    assert "made with train.num_processes=2" in refused.value.message and "\n" not in refused.value.message


def test_the_users_accelerate_config_changes_nothing(straight, tmp_path: Path, monkeypatch) -> None:
    model, lat, reference, weights = straight
    hostile = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    hostile.parent.mkdir(parents=True)
    hostile.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 8\nmixed_precision: fp16\n"
        "deepspeed_config:\n  zero_stage: 3\n  offload_optimizer_device: cpu\nuse_cpu: true\n"
    )
    monkeypatch.setenv("HF_HOME", str(hostile.parents[1]))
    result = _train(tmp_path, model, lat, _checkpointed(), monkeypatch, {"save_trainable_to": str(tmp_path / "w.st")})
    assert json.loads((result.path / "training.json").read_text())["num_processes"] == 2
    again = load_file(tmp_path / "w.st")
    assert all(torch.equal(again[k], weights[k]) for k in weights) and _losses(result) == _losses(reference)


def test_the_demo_runs_with_two_processes_and_its_report_shows_the_global_batch(boothflow, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    boothflow("run", "-c", "configs/demo.toml", "--set", "train.num_processes=2", "--set", "train.cpu_threads=1",
              "--artifacts", tmp_path / "artifacts", "--summary", summary)  # fmt: skip
    result = json.loads(summary.read_text())
    assert result["error"] is None and result["stages"]["train"]["items_processed"] == 30
    train = tmp_path / "artifacts" / "train" / result["stages"]["train"]["key"]
    training = json.loads((train / "training.json").read_text())
    assert (training["num_processes"], training["global_batch"], training["sample_steps"]) == (2, 2, [10, 20])
    page = Path(result["outputs"]["report_html"]).read_text()
    assert "2 (1 per process x 1 accumulation x 2 processes)" in page
