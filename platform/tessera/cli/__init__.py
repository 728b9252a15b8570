"""The `tessera` command: one entry point for every step, in a pod, in a test, and on a laptop.

Each command module imports its heavy dependencies (torch, kopf) inside the command, so
`tessera --help` stays fast and the operator image, which has no torch, can run its commands.
"""

from __future__ import annotations

import sys

import typer

from tessera.cli import (
    agent_commands,
    api_commands,
    experiment_commands,
    job_commands,
    model_commands,
    render_commands,
    serve_commands,
    store_commands,
)
from tessera.errors import TesseraError

app = typer.Typer(
    name="tessera",
    help="Private fine-tuning and serving of financial LLMs on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

api_commands.register(app)
job_commands.register(app)
serve_commands.register(app)
agent_commands.register(app)
render_commands.register(app)
app.add_typer(store_commands.app, name="store", help="List, copy and delete artifacts (s3:// or a directory).")
app.add_typer(model_commands.app, name="model", help="Tiny model, GGUF import, upload to the store.")
app.command("compare")(experiment_commands.compare)
app.add_typer(experiment_commands.app, name="experiment",
              help="Experiments: a grid of FineTuneJobs compared side by side (run, status, report).")


def main() -> None:
    try:
        app()
    except TesseraError as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        sys.exit(error.exit_code)
