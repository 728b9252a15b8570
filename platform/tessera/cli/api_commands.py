"""`tessera crds` and `tessera validate`: the API's rules, available before `kubectl apply`."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.errors import InvalidSpecError


def crds(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the FineTuneJob and Adapter CustomResourceDefinitions."""
    from tessera.api.crd import crds_yaml

    text = crds_yaml()
    if output:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


def validate(
    files: list[Path] = typer.Argument(..., help="FineTuneJob/Adapter YAML files."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. spec.lora.rank=16 (repeatable)."),
) -> None:
    """Check FineTuneJob/Adapter YAML with the operator's rules; list every error."""
    from tessera.api import load_resources

    failures: list[InvalidSpecError] = []
    for path in files:
        try:
            for resource in load_resources(path, set_):
                typer.echo(f"{path}: {resource.kind} {resource.metadata.name} is valid")
        except InvalidSpecError as error:
            failures.append(error)
    if failures:
        problems = [f"{e.source}: {p}" for e in failures for p in e.problems]
        raise InvalidSpecError(problems)


def register(app: typer.Typer) -> None:
    app.command("crds")(crds)
    app.command("validate")(validate)
