"""Placeholder until the owning issue fills it in."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
