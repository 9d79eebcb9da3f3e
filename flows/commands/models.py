"""`boothflow models ls|pretrain-toy`: the base model presets, and pretraining the toy world's model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.commands.common import ArtifactsOpt, ConfigOpt, SetOpt, console, error, run_config, size

app = typer.Typer(no_args_is_help=True, help="Base models and presets.")


@app.command("ls")
def models_ls(config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None):
    """List the presets and which of them are built under the artifact root."""
    from tasks.sd.presets import list_models

    cfg = run_config(config, set_, artifacts)
    table = Table(title="models")
    for column in ("preset", "family", "built", "size", "description"):
        table.add_column(column)
    for row in list_models(cfg.run.artifacts_root):
        built = "yes" if row["built"] else "no"
        table.add_row(row["name"], row["family"], built, size(row["size_bytes"]), row["description"])
    Console().print(table)


@app.command("pretrain-toy")
def models_pretrain_toy(
    out: Annotated[
        Path | None, typer.Option("--out", help="Model folder to write (default: <artifacts>/models/...)")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A rough model in a few minutes (tests, trying it out)")
    ] = False,
    minutes: Annotated[float, typer.Option("--minutes", help="Train at most this long, then save and return")] = 10.0,
    artifacts: ArtifactsOpt = None,
):
    """Pretrain toy-sd on the toy world, resumably: run it again until it says done."""
    from tasks.toy.plan import FULL, QUICK, PretrainError
    from tasks.toy.pretrain import pretrain

    root = run_config(None, [], artifacts).run.artifacts_root
    out = (out or root / "models" / ("toy-sd-quick" if quick else "toy-sd-pretrained")).expanduser().resolve()
    _show_progress_logs()
    try:
        state = pretrain(out, QUICK if quick else FULL, minutes)
    except PretrainError as err:
        error(err)
        raise typer.Exit(1) from None
    cpu = f"{state.cpu_seconds / 60:.1f} CPU minutes so far"
    if state.phase != "done":
        console.print(
            f"paused in phase {state.phase!r} at step {state.step} ({cpu}); run the same command again to go on"
        )
        raise typer.Exit(3)
    scores = ", ".join(f"{name} {100 * value:.0f}%" for name, value in state.fidelity.items())
    console.print(f"done: {out} ({cpu}); caption fidelity: {scores}", highlight=False, markup=False)


def _show_progress_logs() -> None:
    """Outside a flow run Prefect's loggers drop INFO lines; a long command outside one prints them (progress and
    the VAE gate's figures) on stderr, bar or no bar."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("prefect.boothflow")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))
