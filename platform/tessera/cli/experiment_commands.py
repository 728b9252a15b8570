"""`tessera experiment run|status|report`: an Experiment's cells on this machine, or its rows and report.

Built on `tessera.Client` (the notebook API): the CLI adds only the printing.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)

EXPERIMENT_FILE = typer.Option(..., "--file", "-f", exists=True, dir_okay=False, help="Experiment YAML.")
OVERRIDES = typer.Option([], "--set", help="Override a field, e.g. spec.maxParallel=2 (repeatable).")
AS_JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def _client(namespace: str | None = None):  # noqa: ANN202 - tessera.Client, imported lazily
    from tessera.client import Client

    return Client(namespace=namespace) if namespace else Client()


@app.command("run")
def run(
    experiment_file: Path = EXPERIMENT_FILE,
    set_: list[str] = OVERRIDES,
    as_json: bool = AS_JSON,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Run the cells one after the other on this machine (finished cells are not rerun), then write the report."""
    from tessera.api import load_experiment
    from tessera.cli.job_commands import configure_local_run

    configure_local_run()
    experiment = load_experiment(experiment_file, set_)
    outcome = _client().run_experiment(experiment, show_progress=progress)
    if as_json:
        typer.echo(json.dumps(outcome.model_dump(mode="json"), indent=2))
        return
    from tessera.experiment.report import markdown

    typer.echo(markdown(outcome.report), err=True)
    typer.echo(f"ran {len(outcome.ran)} cell(s), {len(outcome.skipped)} finished earlier; "
               f"{outcome.wall_seconds / 60:.1f} minutes", err=True)
    typer.echo(f"report: {outcome.report_uri}/report.html", err=True)


@app.command("status")
def status(experiment_file: Path = EXPERIMENT_FILE, set_: list[str] = OVERRIDES, as_json: bool = AS_JSON) -> None:
    """The experiment's cells as recorded so far (phase, score, cost, wall time, adapter)."""
    from tessera.api import load_experiment

    experiment = load_experiment(experiment_file, set_)
    current = _client().experiment_status(experiment)
    if as_json:
        typer.echo(json.dumps(current.to_wire(), indent=2))
        return
    typer.echo(f"{experiment.metadata.name}: {current.phase}, {current.cells_done}/{current.cells_total} cells done, "
               f"best {current.best_cell or '-'} ({current.best_score if current.best_score is not None else '-'})")
    for cell in current.cells:
        score = "-" if cell.score is None else f"{cell.score:.4f}"
        wall = "-" if cell.wall_seconds is None else f"{cell.wall_seconds / 60:.1f} min"
        typer.echo(f"  {cell.name}  {cell.phase:<9} score {score:<7} wall {wall:<9} "
                   f"{', '.join(f'{k}={v}' for k, v in cell.values.items())}  {cell.reason or cell.adapter_uri or ''}")


@app.command("report")
def report(
    name: str = typer.Argument(..., help="The experiment's name."),
    namespace: str = typer.Option("default", "--namespace", "-n"),
    store: str = typer.Option(".tessera/store", "--store", help="The store the experiment's template names."),
    as_json: bool = AS_JSON,
) -> None:
    """Print the comparison table of a finished experiment (its report in the store)."""
    from tessera.experiment.report import markdown

    document = _client().report(name, namespace=namespace, store=store)
    typer.echo(json.dumps(document, indent=2) if as_json else markdown(document), nl=not as_json)


def compare(
    uris: list[str] = typer.Argument(..., help="Published adapter URIs (.../adapters/<ns>/<name>/<version>)."),
    metric: str = typer.Option("accuracy", "--metric", help="The metric to rank by."),
    output: Path | None = typer.Option(None, "--html", help="Also write the HTML report with its plots here."),
    as_json: bool = AS_JSON,
) -> None:
    """Compare published adapters from their model cards and training logs (older runs too)."""
    from tessera.api.experiment import Selection
    from tessera.experiment.report import compare_adapters, figures, html_page, markdown
    from tessera.experiment.results import read_adapter_result
    from tessera.experiment.selection import select

    results = [read_adapter_result(uri) for uri in uris]
    selection = Selection(metric=metric)
    document = compare_adapters(results, selection)
    if output is not None:
        output.write_text(html_page(document, figures(results, select(results, selection))))
    typer.echo(json.dumps(document, indent=2) if as_json else markdown(document), nl=not as_json)
