"""The `boothflow` command: run the pipeline or one stage, and look at the cache and the models.

The commands live in flows/commands/, one module per group; config errors are one line without a traceback.
"""

from __future__ import annotations

import os

import typer

from flows.commands import cache, models, plan, run, serve, subjects, sweep
from flows.server import HEARTBEAT_ENV, HEARTBEAT_SECONDS

# The temporary server Prefect starts without PREFECT_API_URL otherwise logs an error on offline machines.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Every flow run this process and the workers it starts run sends heartbeats that often (flows/liveness.py), set
# before Prefect reads its settings.
os.environ.setdefault(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))

app = typer.Typer(no_args_is_help=True, add_completion=False, help="DreamBooth fine-tuning as a cached Prefect flow.")
app.add_typer(cache.app, name="cache")
app.add_typer(models.app, name="models")
for command in (
    run.run,
    run.stage,
    sweep.sweep,
    subjects.subjects,
    plan.plan,
    run.rerun,
    run.runs,
    cache.forget,
    serve.serve,
    serve.worker,
    serve.notify,
    serve.ui,
):
    app.command()(command)

if __name__ == "__main__":
    app()
