"""Placeholder until the owning issue fills it in."""

import typer

app = typer.Typer(no_args_is_help=True)
