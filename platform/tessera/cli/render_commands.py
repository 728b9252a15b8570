"""`tessera render` prints what the operator would create for a job; `tessera operator` runs it."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.errors import InvalidSpecError


def register(app: typer.Typer) -> None:
    app.command("render")(render_command)
    app.command("operator")(operator_command)


def render_command(
    file: Path = typer.Option(..., "-f", "--file", help="FineTuneJob YAML."),
    overrides: list[str] = typer.Option([], "--set", help="path=value, like helm --set (repeatable)."),
) -> None:
    """Print the objects the operator creates for a job, as multi-document YAML (like `helm template`).

    The installation's settings come from the same TESSERA_* variables the operator reads (trainer
    image, GPU resource name, default store, launcher); the PyTorchJob, or the TrainingRuntime and
    TrainJob, are the ones the workflow's train step will create.
    """
    import yaml
    from tessera_operator.builders import effective_job, render_objects
    from tessera_operator.config import OperatorConfig

    from tessera.api import apply_overrides
    from tessera.safe_yaml import safe_load

    try:
        document = safe_load(file.read_text())
    except FileNotFoundError:
        raise InvalidSpecError(["file not found"], str(file)) from None
    except yaml.YAMLError as error:
        raise InvalidSpecError([f"not valid YAML: {error}"], str(file)) from None
    try:
        job = effective_job(apply_overrides(document, overrides), OperatorConfig.from_env())
    except InvalidSpecError as error:
        raise InvalidSpecError(error.problems, str(file)) from None
    notes = {
        "ConfigMap": "the job's spec, frozen at submission; every step reads it at /config/job.yaml",
        "Workflow": "runs tessera-finetune: prepare, train, evaluate, publish",
        "PyTorchJob": "created by the workflow's train step (not by the operator)",
        "TrainingRuntime": "the job's Trainer v2 runtime, created by the workflow's train step",
        "TrainJob": "created by the workflow's train step on that runtime (not by the operator)",
        "InferenceService": "created with the first Adapter for this base model, if it does not exist",
    }
    for obj in render_objects(job, OperatorConfig.from_env()):
        typer.echo(f"---\n# {obj['kind']}: {notes[obj['kind']]}")
        typer.echo(yaml.safe_dump(obj, sort_keys=False, width=120), nl=False)


def operator_command(
    namespace: list[str] = typer.Option([], "--namespace", "-n", help="Namespace to watch (repeatable); "
                                        "none: all namespaces."),
    liveness: str = typer.Option(None, help="Health endpoint, e.g. http://0.0.0.0:8080/healthz."),
    peering: str = typer.Option(None, help="KopfPeering name to join; none: run standalone."),
    priority: int = typer.Option(0, help="Priority among peers (the highest one runs)."),
    log_format: str = typer.Option("full", help="plain, full or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every handler call."),
) -> None:
    """Run the operator (kopf): FineTuneJobs → Workflows → Adapters hot-loaded into KServe.

    Connects with the in-cluster ServiceAccount, else the kubeconfig (KUBECONFIG). The same as
    `kopf run -m tessera_operator.handlers` with kopf's options of the same names.
    """
    import kopf
    import tessera_operator.handlers  # noqa: F401  (registers the handlers)

    formats = {f.name.lower(): f for f in kopf.LogFormat}
    if log_format not in formats:
        raise typer.BadParameter(f"--log-format must be one of {', '.join(formats)}")
    kopf.configure(verbose=verbose, log_format=formats[log_format])
    kopf.run(
        clusterwide=not namespace,
        namespaces=namespace,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )
