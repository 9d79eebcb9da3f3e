"""Sweeps: a sweep file resolved into cells, the toy sweep run in-process (shared caches, a value added later runs
only the new cells), the same cells on a process work pool with two workers under the GPU limit, and the
comparison page in Chromium."""

from __future__ import annotations

import itertools
import json
import signal
import time
import tomllib
from pathlib import Path
from uuid import UUID

import processes
import pytest
from browser import chromium
from metric_models import build_clip, build_dino
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.core.config import ConfigError
from tasks.core.shipped import shipped_root
from tasks.core.sweeps import MAX_CELLS, load_sweep
from tasks.sd.models import resolve
from tasks.stages.comparison import SECTIONS

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
QUICK = ["train.steps=8", "generate.seeds=2", "prior.num_images=8"]  # short cells: 8 steps, 2 seeds, 8 classes
CLOSE_UP, TOY, AMONG = "data/toy_sets/close_up", "data/toy", "data/toy_sets/among_shapes"


def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_a_matrix_resolves_into_named_cells_with_shared_settings(tmp_path: Path) -> None:
    spec = load_sweep(Path("toy"), ["train.steps=40", f'data.instance_dir=["{CLOSE_UP}", "{TOY}"]'], tmp_path)
    assert [cell.name for cell in spec.cells] == [
        "instance_dir=close_up,train_text_encoder=true",
        "instance_dir=close_up,train_text_encoder=false",
        "instance_dir=toy,train_text_encoder=true",
        "instance_dir=toy,train_text_encoder=false",
    ]
    first, last = spec.cells[0].config, spec.cells[-1].config
    assert first.run.name == "toy instance_dir=close_up,train_text_encoder=true"
    assert {c.config.train.steps for c in spec.cells} == {40} and first.generate.seeds == tuple(range(16))
    assert first.data.instance_dir == Path.cwd() / CLOSE_UP  # --set folders: relative to the working directory
    assert (first.train.train_text_encoder, last.train.train_text_encoder) == (True, False)
    assert {c.config.run.artifacts_root for c in spec.cells} == {tmp_path}
    shipped = load_sweep(Path("toy"))  # the file's own folders are the shipped data, wherever it is installed
    assert [c.config.data.instance_dir for c in shipped.cells][::2] == [shipped_root() / f for f in (CLOSE_UP, AMONG,
                                                                                                      TOY)]  # fmt: skip


def test_explicit_runs_and_a_config_axis(tmp_path: Path) -> None:
    path = _sweep_file(
        tmp_path,
        """
name = "mine"
[set]
train = { steps = 5 }
[matrix]
config = ["demo", "toy"]
[[runs]]
name = "slow"
"train.learning_rate" = 1e-6
""",
    )
    spec = load_sweep(path)
    assert [c.name for c in spec.cells] == ["config=demo", "config=toy", "slow"]
    assert [c.config.model.id for c in spec.cells] == ["tiny-sd15", "toy-sd", "tiny-sd15"]
    assert [c.config.train.steps for c in spec.cells] == [5, 5, 5]
    assert spec.cells[2].config.train.learning_rate == 1e-6


BAD_SWEEPS = [
    ('name = "x"\nmatrix = { "train.steps" = 5 }', "matrix 'train.steps' must be a non-empty list"),
    ('name = "x"\nmatrix = { "train.steps" = [] }', "matrix 'train.steps' must be a non-empty list"),
    ('name = "x"\nmatrix = { "train.steps" = [5, 5] }', "matrix 'train.steps' lists a value twice"),
    ('name = "x"\nmatrix = { "train.stepz" = [5, 6] }', "cell 'stepz=5': unknown setting 'train.stepz'"),
    ('name = "x"\nmatrix = { "train.steps" = [5, -1] }', "cell 'steps=-1': train.steps = -1"),
    ('name = "x"\nmatrix = { "run.name" = ["a", "b"] }', "run.name cannot vary"),
    ('name = "x"\nmatrix = { "run.artifacts_root" = ["a", "b"] }', "run.artifacts_root cannot vary"),
    ('name = "x"', "no cells; add a [matrix]"),
    ('name = "x"\nmatrix = { "train.steps" = [1, 2] }\n[[runs]]\n"train.steps" = 1', "are the same run"),
    ('name = "x"\n[[runs]]\nname = "a"\n[[runs]]\nname = "a"\n"train.steps" = 3', "two cells are named 'a'"),
    (
        'name = "x"\nmatrix = { "train.steps" = [1, 2], "train.seed" = [1, 2] }\n[[runs]]\nname = "steps=1,seed=1"',
        "two cells are named 'steps=1,seed=1'",
    ),
    (
        f'name = "x"\nmatrix = {{ "train.steps" = {list(range(1, 18))}, "train.seed" = {list(range(16))} }}',
        f"272 cells; a sweep runs at most {MAX_CELLS}",
    ),
    ('name = "../up"\nmatrix = { "train.steps" = [1, 2] }', "name: String should match pattern"),
    ('name = "x"\nmatrixx = { "train.steps" = [1, 2] }', "allowed at the top level: name, config, set, matrix, runs"),
    ('name = "x"\nconfig = "nope"\nmatrix = { "train.steps" = [1, 2] }', "config file 'nope' not found"),
    ('name = "x\nmatrix', "is not valid TOML"),
    ('name = "x"\nmatrix = { config = ["toy", 3] }', "cell 'config=3': config = 3: expected a config file or preset"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SWEEPS, ids=[m for _, m in BAD_SWEEPS])
def test_a_bad_sweep_file_is_one_line_naming_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_sweep(_sweep_file(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert str(tmp_path / "sweep.toml") in str(caught.value)


def test_the_sweep_command_checks_every_cell_before_any_runs(boothflow, tmp_path: Path) -> None:
    missing = boothflow("sweep", "writeup", "--artifacts", tmp_path, check=False)  # its folders are the user's
    assert missing.returncode == 2, missing.stderr
    assert "sweep writeup, cell 'config=sd15,instance_dir=face': " in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "runs").exists()
    unknown = boothflow("sweep", tmp_path / "none.toml", check=False)
    assert unknown.returncode == 2 and "not found; shipped sweeps: dreambench, toy, writeup" in unknown.stderr
    alone = boothflow("sweep", "toy", "--slots", "2", check=False)
    assert alone.returncode == 2 and "it needs --pool" in alone.stderr


def test_the_sweep_command_prints_a_message_brackets_and_all(boothflow, tmp_path: Path) -> None:
    empty = boothflow("sweep", _sweep_file(tmp_path, 'name = "x"'), check=False)
    assert empty.returncode == 2
    assert empty.stderr.strip().endswith("no cells; add a [matrix] of settings or [[runs]]"), empty.stderr


# ---- the toy sweep, end to end against the suite's Prefect server ----


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


def _sweep(boothflow, root: Path, folders: list[str], *more: str) -> dict:
    summary = root / f"sweep-{time.monotonic_ns()}.json"
    sets = [*QUICK, f"data.instance_dir={json.dumps(folders)}", *more]
    boothflow("sweep", "toy", "--artifacts", root, "--summary", summary, *(x for s in sets for x in ("--set", s)))
    return json.loads(summary.read_text())


def _stages(result: dict) -> dict[str, dict[str, dict]]:
    return {cell["cell"]: cell["summary"]["stages"] for cell in result["cells"]}


@pytest.fixture(scope="module")
def two_by_two(boothflow, root: Path) -> dict:
    return _sweep(boothflow, root, [CLOSE_UP, TOY])


def test_the_toy_sweep_shares_caches_and_adding_a_value_runs_only_new_cells(
    boothflow, two_by_two: dict, root: Path, prefect_server: str
) -> None:
    first = _stages(two_by_two)
    assert len(first) == 4 and {c["state"] for c in two_by_two["cells"]} == {"Completed"}
    ran = {stage: [cell for cell, stages in first.items() if stages[stage]["status"] == "ran"] for stage in
           ("preprocess", "class_images", "latents", "train")}  # fmt: skip
    assert len(ran["preprocess"]) == 2 and len(ran["latents"]) == 2  # once per dataset
    assert len(ran["class_images"]) == 1 and len(ran["train"]) == 4  # once per base model and prompt; every cell
    assert sum(stages["class_images"]["items_processed"] for stages in first.values()) == 8
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        parent = UUID(_sweep_run(client, two_by_two))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))  # fmt: skip
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent])))}  # fmt: skip
    assert sorted(run.name for run in children) == sorted(first)  # each cell a flow run under the sweep's run
    assert artifacts["sweep-progress"].data == 100.0 and artifacts["sweep-progress"].description == "4 of 4 cells"
    assert len(json.loads(artifacts["sweep-cells"].data)) == 4
    assert artifacts["sweep-comparison"].data.endswith("sweeps/toy/comparison.html)")  # a link, as markdown

    grown = _sweep(boothflow, root, [CLOSE_UP, TOY, AMONG])
    now = _stages(grown)
    assert len(now) == 6
    for cell in first:  # every old cell: all cached, nothing processed
        assert {s["status"] for s in now[cell].values()} == {"cached"}, (cell, now[cell])
        assert sum(s["items_processed"] for s in now[cell].values()) == 0
    new = [cell for cell in now if cell not in first]
    assert [cell.split(",")[0] for cell in new] == ["instance_dir=among_shapes"] * 2
    assert [now[cell]["preprocess"]["status"] for cell in new] == ["ran", "cached"]
    assert {now[cell]["class_images"]["status"] for cell in new} == {"cached"}
    assert {now[cell]["train"]["status"] for cell in new} == {"ran"}
    rows = json.loads((root / "sweeps" / "toy" / "comparison.json").read_text())["cells"]
    assert [row["cell"] for row in rows] == list(now)
    assert all(row["final_loss"] > 0 and row["training_seconds"] > 0 for row in rows)
    assert rows[1]["differs"] == ["data.instance_dir", "train.train_text_encoder"]  # close_up, text encoder off


def _sweep_run(client, result: dict) -> str:
    cell = client.read_flow_run(UUID(result["cells"][0]["flow_run_id"]))
    parent_task = client.read_task_run(cell.parent_task_run_id)
    return str(parent_task.flow_run_id)


def test_the_comparison_opens_in_chromium_without_horizontal_overflow(two_by_two: dict, root: Path) -> None:
    page_file = Path(two_by_two["comparison"])
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(page_file.as_uri(), wait_until="load")
        texts = {section: page.inner_text(f"#{section}") for section in SECTIONS if section != "reference"}
        assert page.query_selector("#reference") is None  # the toy sweep names no published figures
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        images = page.eval_on_selector_all("img", "elements => elements.map(e => [e.complete, e.naturalWidth])")
        links = page.eval_on_selector_all("#cells a", "elements => elements.map(e => e.href)")
    assert widths[0] == widths[1] == 1280, widths
    cells = json.loads((page_file.parent / "comparison.json").read_text())["cells"]
    for row in cells:
        assert row["cell"] in texts["cells"] and row["cell"] in texts["samples"]
    assert texts["cells"].count("Completed") == len(cells)
    assert images and all(done and width > 0 for done, width in images)  # the loss plot and every sample
    assert len(links) == len(cells) and all(Path(link.removeprefix("file://")).is_file() for link in links)


def test_a_sweep_on_a_process_pool_uses_both_workers_one_training_at_a_time(
    boothflow, two_by_two: dict, root: Path, cli_env: dict, prefect_server: str, tmp_path: Path
) -> None:
    pool = "sweep-test-pool"
    prefect = str(BIN / "prefect")
    processes.run([prefect, "work-pool", "create", pool, "--type", "process"], env=cli_env, check=True,
                  capture_output=True)  # fmt: skip
    env = {**cli_env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    workers = []
    try:
        for name in ("w1", "w2"):
            workers.append(processes.start([prefect, "worker", "start", "--pool", pool, "--limit", "1", "--name",
                                            name], log=tmp_path / f"{name}.log", env=env))  # fmt: skip
        summary = tmp_path / "pool.json"
        sets = [*QUICK, "train.steps=4", "train.seed=1", f"data.instance_dir={json.dumps([CLOSE_UP, TOY])}"]
        boothflow("sweep", "toy", "--pool", pool, "--slots", "1", "--artifacts", root, "--summary", summary,
                  *(x for s in sets for x in ("--set", s)))  # fmt: skip
    finally:
        processes.stop(*workers, first=signal.SIGINT)  # a worker stops on SIGINT (it ignores SIGTERM for minutes)
    result = json.loads(summary.read_text())
    assert [c["state"] for c in result["cells"]] == ["Completed"] * 4
    assert {c["summary"]["run"]["worker"] for c in result["cells"]} == {"w1", "w2"}
    assert {c["summary"]["stages"]["train"]["status"] for c in result["cells"]} == {"ran"}
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        ids = [UUID(c["flow_run_id"]) for c in result["cells"]]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        assert {run.deployment_id for run in runs} != {None} and all(run.parent_task_run_id for run in runs)
        trainings = sorted(
            (task.start_time, task.end_time)
            for task in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            if task.name.startswith("train")
        )
    assert len(trainings) == 4
    for (_, end), (start, _) in itertools.pairwise(trainings):
        assert end <= start, trainings  # the limit held: one training at a time


def _toml(sweep: dict) -> str:
    """A sweep as TOML (JSON's strings, numbers, booleans and arrays are TOML's too)."""
    lines = [f"{key} = {json.dumps(sweep[key])}" for key in ("name", "config", "root")]
    lines += ["[set]", *(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sweep["set"].items())]
    for name, figures in sweep["reference"].items():
        lines += [f"[reference.{json.dumps(name)}]", *(f"{k} = {v}" for k, v in figures.items())]
    for run in sweep["runs"]:
        lines += ["[[runs]]", *(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in run.items())]
    return "\n".join(lines) + "\n"


def test_the_dreambench_preset_runs_its_shape_on_toy_sd_beside_the_papers_figures(
    boothflow, root: Path, tmp_path: Path
) -> None:
    preset = tomllib.loads((REPO / "configs" / "sweeps" / "dreambench.toml").read_text())
    tokenizer = resolve("tiny-sd15", "", tmp_path / "models").path / "tokenizer"
    clip, dino = build_clip(tmp_path / "clip", tokenizer), build_dino(tmp_path / "dino")
    runs = {run["name"]: run for run in preset["runs"]}
    assert len(runs) == 30 and len(runs["cat"]["generate.prompts"]) == len(preset["set"]["generate.prompts"]) == 25
    subjects = [{**runs["backpack"], "data.instance_dir": "toy"},  # an object subject and a live one, on toy images
                {**runs["cat"], "data.instance_dir": "toy_sets/close_up"}]  # fmt: skip
    small = {"evaluate.clip_model": str(clip), "evaluate.dino_model": str(dino), "train.steps": 4,
             "generate.seeds": 1, "generate.steps": 4, "prior.num_images": 4, "prior.steps": 4}  # fmt: skip
    shape = {**preset, "config": "toy", "root": str(REPO / "data"), "set": {**preset["set"], **small}, "runs": subjects}
    (tmp_path / "dreambench.toml").write_text(_toml(shape))
    summary = tmp_path / "summary.json"
    boothflow("sweep", tmp_path / "dreambench.toml", "--artifacts", root, "--summary", summary)
    result = json.loads(summary.read_text())
    assert [(c["cell"], c["state"]) for c in result["cells"]] == [("backpack", "Completed"), ("cat", "Completed")]
    page = Path(result["comparison"])
    rows = json.loads((page.parent / "comparison.json").read_text())["reference"]
    finetuned = [json.loads((Path(c["summary"]["outputs"]["metrics_csv"]).parent / "metrics.json").read_text())
                 for c in result["cells"]]  # fmt: skip
    for metric in ("dino", "clip_i", "clip_t"):
        scores = [next(r[metric] for r in m["rows"] if r["kind"] == "finetuned") for m in finetuned]
        assert rows[0][metric] == pytest.approx(sum(scores) / 2), metric  # the cells' mean, as the paper averages
    assert rows[2] == {"name": "DreamBooth (Stable Diffusion), paper", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
    with chromium() as browser:
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(page.as_uri(), wait_until="load")
        shown = tab.inner_text("#reference")
    assert "this sweep: fine-tuned (mean of 2 cells)" in shown and "real images (mean of 2 cells)" in shown
    assert "DreamBooth (Stable Diffusion), paper\t0.668\t0.803\t0.305" in shown
    assert f"{rows[0]['dino']:.3f}\t{rows[0]['clip_i']:.3f}\t{rows[0]['clip_t']:.3f}" in shown
