"""The job steps: `tessera [label|]prepare|train|evaluate|publish`, and `tessera run` for all on one machine.

Each takes the FineTuneJob YAML (`-f`) and `--set path=value` overrides, as `helm --set` does.
The Argo Workflow's steps and the PyTorchJob's workers run exactly these commands.
Human output goes to stderr; `--json` puts one JSON object on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from tessera.api.records import Record

JOB_FILE = typer.Option(..., "--file", "-f", exists=True, dir_okay=False, help="FineTuneJob YAML.")
OVERRIDES = typer.Option([], "--set", help="Override a field, e.g. spec.training.epochs=2 (repeatable).")
AS_JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr.")


def configure_local_run() -> None:
    """Logging, redaction and the environment every step that loads a model runs under."""
    from tessera.redact import install_log_redaction

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_log_redaction()
    # No hub: every model is a local or store directory. Keeps a typo from turning into a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Cores are often shared (a laptop, CI, a pod under a CPU limit). OpenMP threads that spin while
    # waiting for a descheduled sibling then make training an order of magnitude slower; sleeping
    # threads do not. Read once, when torch loads: hence here, before any step imports it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _setup(job_file: Path, overrides: list[str]) -> Any:
    from tessera.api import load_job

    configure_local_run()
    return load_job(job_file, overrides)


@contextmanager
def _json_only_stdout(as_json: bool) -> Iterator[None]:
    """While a step runs, whatever writes to stdout (DeepSpeed's logger, C extensions) lands on
    stderr instead, so that `--json` leaves exactly one JSON object on stdout."""
    if not as_json:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _emit(result: Any, as_json: bool) -> None:
    if as_json:
        document = result.to_json() if isinstance(result, Record) else result
        typer.echo(json.dumps(document, indent=2, default=str))


def label(
    job_file: Path = JOB_FILE, set_: list[str] = OVERRIDES, as_json: bool = AS_JSON, progress: bool = PROGRESS,
) -> None:
    """Have spec.dataset.teacher label the rows without a label (cached: a rerun sends no request twice)."""
    from tessera.label import label_job

    job = _setup(job_file, set_)
    with _json_only_stdout(as_json):
        manifest = label_job(job, show_progress=progress)
    counts = manifest["counts"]
    typer.echo(f"labelled {counts['labelled']} of {counts['asked']} rows ({counts['cached']} from the cache): "
               f"{counts['kept']} rows kept, {counts['droppedLowConfidence']} dropped for low confidence, "
               f"{counts['unparsed']} unparsed; {manifest['wallSeconds']:.1f}s, cost "
               f"{manifest['cost']['amount']:.4f} {manifest['cost']['currency']}", err=True)
    _emit(manifest, as_json)


def prepare(job_file: Path = JOB_FILE, set_: list[str] = OVERRIDES, as_json: bool = AS_JSON) -> None:
    """Validate, split and write the job's dataset to its store prefix (bad rows reported by row)."""
    from tessera.data import prepare as prepare_dataset

    job = _setup(job_file, set_)
    with _json_only_stdout(as_json):
        prepared = prepare_dataset(job)
    typer.echo(f"prepared {len(prepared.train)} training and {len(prepared.eval)} evaluation examples "
               f"({len(prepared.bad_rows)} bad rows) in {prepared.uri}", err=True)
    _emit(prepared.manifest, as_json)


def train(
    job_file: Path = JOB_FILE,
    set_: list[str] = OVERRIDES,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
    result: Path | None = typer.Option(None, "--result", help="Write the result JSON here (rank 0)."),
) -> None:
    """Train the adapter (one process, torchrun or a PyTorchJob worker); resumes from the last checkpoint."""
    from tessera.train.distributed import DistEnv
    from tessera.train.trainer import train_job

    job = _setup(job_file, set_)
    env = DistEnv.from_environ()
    with _json_only_stdout(as_json):
        outcome = train_job(job, show_progress=progress, env=env)
    if not env.is_main:
        return
    if result is not None:
        result.write_text(json.dumps(outcome.to_json()))
    typer.echo(f"trained {outcome.step}/{outcome.total_steps} steps, loss {outcome.train_loss}, "
               f"checkpoint {outcome.checkpoint}", err=True)
    _emit(outcome, as_json)


def evaluate(
    job_file: Path = JOB_FILE,
    set_: list[str] = OVERRIDES,
    adapter: str | None = typer.Option(None, "--adapter", help="Adapter URI (default: the job's checkpoint)."),
    data: str | None = typer.Option(None, "--data", help="Dataset URI (default: the job's eval split)."),
    serving_url: str | None = typer.Option(
        None, "--serving-url", help="A teacher job's student: also time it on this OpenAI-compatible server "
        "(base URL, e.g. http://127.0.0.1:8080/openai/v1), where it is loaded as --serving-model."),
    serving_model: str | None = typer.Option(None, "--serving-model", help="Default: the job's adapter name."),
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Base model vs adapter on held-out data: the task's metrics, samples/s, a table or JSON."""
    from tessera.evaluate.report import format_table
    from tessera.evaluate.runner import evaluate_job
    from tessera.experiment.katib import push_metrics

    job = _setup(job_file, set_)
    with _json_only_stdout(as_json):
        serving = (serving_url, serving_model or job.adapter_name) if serving_url else None
        report = evaluate_job(job, adapter_uri=adapter, data_uri=data, show_progress=progress, serving=serving)
    typer.echo(format_table(report), err=as_json)
    if adapter is None and data is None:
        push_metrics(report)  # only when Katib runs this job as a trial (KATIB_TRIAL_NAME is set)
    _emit(report, as_json)


def publish(job_file: Path = JOB_FILE, set_: list[str] = OVERRIDES, as_json: bool = AS_JSON) -> None:
    """Publish the evaluated adapter and its model card to adapters/<ns>/<name>/<version>/, atomically."""
    from tessera.publish import publish_job

    job = _setup(job_file, set_)
    with _json_only_stdout(as_json):
        record = publish_job(job)
    typer.echo(f"published {record.name} {record.version} to {record.uri}", err=True)
    _emit(record, as_json)


def run(
    job_file: Path = JOB_FILE,
    set_: list[str] = OVERRIDES,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
    fresh: bool = typer.Option(False, "--fresh", help="Discard the job's earlier data, checkpoints and report."),
) -> None:
    """prepare -> train -> evaluate -> publish on this machine (the embedded mode)."""
    from tessera.local.runner import run_job

    job = _setup(job_file, set_)
    with _json_only_stdout(as_json):
        outcome = run_job(job, fresh=fresh, show_progress=progress)
    if not as_json:
        typer.echo(f"adapter: {outcome.adapter_uri}", err=True)
    _emit(outcome, as_json)


def register(app: typer.Typer) -> None:
    for command in (label, prepare, train, evaluate, publish, run):
        app.command(command.__name__)(command)
