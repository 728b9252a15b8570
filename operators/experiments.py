"""The Experiment handlers: one FineTuneJob per matrix cell, at most `maxParallel` at a time, a status
table of the cells, the report in the store, and the winner (only the winner) promoted to an Adapter.

Level-based and restart-safe: every pass reads the cells' jobs by their names (derived from the
experiment and a hash of the cell, so a restarted operator finds the same ones), counts those not
finished, and creates the next cells in matrix order up to `maxParallel`. A create that meets an
existing job (a pass that raced another) reads it instead, so no cell ever gets two jobs. Jobs are
owned by the experiment (deleting it deletes them); the promoted Adapter is not (it stays served).
With `spec.search`, Katib runs the trials instead (`tessera_operator.katib`).
"""

from __future__ import annotations

import datetime
from typing import Any

import kopf
from tessera.api import API_VERSION, GROUP, TERMINAL_PHASES, VERSION, Experiment, FineTuneJob, parse_resource
from tessera.api.records import PublishedRecord
from tessera.errors import InvalidSpecError, StoreError
from tessera.experiment.cells import cell_jobs
from tessera.experiment.report import write_report
from tessera.experiment.results import CellResult, read_cell_result
from tessera.experiment.status import experiment_status
from tessera.job_artifacts import JobArtifacts
from tessera.redact import redact
from tessera_operator.artifacts import open_job_store
from tessera_operator.builders import build_adapter, owner_reference
from tessera_operator.config import OperatorConfig
from tessera_operator.kube import Kube, Transient

EXPERIMENTS = (GROUP, VERSION, "experiments")
CONFIG = OperatorConfig.from_env()
FINISHED = ("Succeeded", "Failed")


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in FINISHED


@kopf.on.resume(*EXPERIMENTS)
@kopf.on.create(*EXPERIMENTS)
def experiment_created(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    if status.get("phase") not in FINISHED:
        reconcile(body, patch, memo.kube)


@kopf.timer(*EXPERIMENTS, interval=CONFIG.poll_seconds, initial_delay=CONFIG.poll_seconds, when=_unfinished)
def experiment_poll(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    reconcile(body, patch, memo.kube)


def reconcile(body: kopf.Body, patch: kopf.Patch, kube: Kube) -> None:
    """One pass: read the cells' jobs, start the next ones, write the table (and at the end the report)."""
    try:
        experiment = parse_resource(dict(body))
    except InvalidSpecError as error:
        message = redact("; ".join(error.problems))
        patch.status.update({"phase": "Failed", "message": message})
        kopf.warn(body, reason="InvalidSpec", message=message)
        return
    assert isinstance(experiment, Experiment)
    if experiment.spec.search is not None:
        from tessera_operator.katib import reconcile_search

        reconcile_search(body, experiment, patch, kube)
        return
    try:
        _reconcile_grid(body, experiment, patch, kube)
    except Transient as error:
        raise kopf.TemporaryError(f"experiment {experiment.metadata.name}: {error}",
                                  delay=min(CONFIG.poll_seconds, 30)) from None


def _reconcile_grid(body: kopf.Body, experiment: Experiment, patch: kopf.Patch, kube: Kube) -> None:
    namespace = experiment.metadata.namespace
    cells = cell_jobs(experiment)
    found = {job.metadata.name: kube.get(API_VERSION, "FineTuneJob", namespace, job.metadata.name)
             for _, job in cells}
    running = sum(1 for obj in found.values() if obj is not None and _phase(obj) not in TERMINAL_PHASES)
    for cell, job in cells:
        name = job.metadata.name
        if found[name] is not None or running >= experiment.spec.max_parallel:
            continue
        manifest = job.to_manifest()
        manifest["metadata"]["ownerReferences"] = [owner_reference(dict(body))]
        found[name], created = kube.create(manifest)
        running += 1
        if created:
            kopf.info(body, reason="CellStarted", message=f"FineTuneJob {name} started for {cell.describe()}")

    rows = [_row(cell.values, cell.repeat, name, found[name]) for cell, name in
            ((cell, job.metadata.name) for cell, job in cells)]
    status = experiment_status(experiment, rows)
    if status.cells_done == status.cells_total:
        status = _finish(body, experiment, cells, rows, kube)
    previous = body.get("status") or {}
    for cell in status.cells:
        before = next((c for c in previous.get("cells") or [] if c.get("name") == cell.name), {})
        if cell.phase == "Failed" and before.get("phase") != "Failed":
            kopf.warn(body, reason="CellFailed", message=f"FineTuneJob {cell.name} failed: {cell.reason}")
    wire = status.to_wire()
    wire["observedGeneration"] = body["metadata"].get("generation")
    patch.status.update(wire)


def _phase(obj: dict[str, Any]) -> str:
    return (obj.get("status") or {}).get("phase") or "Pending"


def _row(values: dict[str, Any], repeat: int, name: str, obj: dict[str, Any] | None) -> CellResult:
    """A cell's row from its job's status (what the table shows while cells run)."""
    if obj is None:
        return CellResult(name=name, values=values, repeat=repeat, phase="Pending")
    status = obj.get("status") or {}
    metrics = status.get("metrics") or {}
    return CellResult(
        name=name, values=values, repeat=repeat, phase=_phase(obj),
        reason=(status.get("error") or {}).get("message"),
        adapter_uri=(status.get("adapterRef") or {}).get("uri"),
        adapter_scores=dict(metrics.get("adapter") or {}), base_scores=dict(metrics.get("base") or {}),
        train_loss_final=metrics.get("trainLoss"), trained_tokens=status.get("trainedTokens"),
        device_hours=status.get("gpuHours"), cost=(status.get("cost") or {}).get("amount"),
        currency=(status.get("cost") or {}).get("currency") or "USD",
        wall_seconds=_seconds_between(status.get("startTime"), status.get("completionTime")),
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _credentials(experiment: Experiment, kube: Kube) -> dict[str, str] | None:
    secret = experiment.spec.template.spec.store.credentials_secret
    return kube.secret_data(experiment.metadata.namespace, secret) if secret else None


def _finish(body: kopf.Body, experiment: Experiment, cells: list[Any], rows: list[CellResult], kube: Kube) -> Any:
    """Every cell ended: the full rows from the store, the report, the winner promoted if asked."""
    credentials = _credentials(experiment, kube)
    store_root = open_job_store(experiment.spec.template.spec.store.uri, credentials)
    results = []
    for (cell, job), row in zip(cells, rows, strict=True):
        if row.phase != "Succeeded":
            results.append(row)
            continue
        try:
            artifacts = JobArtifacts(store_root[0], store_root[1], job)
            results.append(read_cell_result(job, values=cell.values, repeat=cell.repeat,
                                            wall_seconds=row.wall_seconds, artifacts=artifacts))
        except (StoreError, KeyError, ValueError) as error:
            results.append(row.model_copy(update={"reason": f"its records cannot be read: {redact(error)}"}))
    try:
        report_uri, _ = write_report(experiment, results, store_root)
    except StoreError as error:
        raise kopf.TemporaryError(f"writing the report: {redact(error)}", delay=min(CONFIG.poll_seconds, 30)) from None
    status = experiment_status(experiment, results, report_uri)
    if status.winner is not None:
        kopf.info(body, reason="WinnerSelected", message=f"{status.winner.cell}: {status.winner.reason}")
        if experiment.spec.promote:
            _promote(body, experiment, cells, status.winner.cell, store_root, kube)
    else:
        kopf.warn(body, reason="NoWinner", message=status.message or "no cell succeeded")
    return status


def _promote(body: kopf.Body, experiment: Experiment, cells: list[Any], winner: str, store_root: Any,
             kube: Kube) -> None:
    """The winner's adapter through the normal Adapter path (not owned by the experiment: it stays served)."""
    job: FineTuneJob = next(job for _, job in cells if job.metadata.name == winner)
    serving = experiment.spec.template.spec.serving
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"serving": serving})})
    artifacts = JobArtifacts(store_root[0], store_root[1], job)
    from tessera.api import paths

    key = artifacts.key(paths.published_key(job))
    published = PublishedRecord.read(artifacts.store.get_json(key), key)
    adapter = build_adapter(job, published)
    _, created = kube.create(adapter)
    if created:
        kopf.info(body, reason="WinnerPromoted", message=f"Adapter {adapter['metadata']['name']} serves {winner}")
