"""The embedded runner of an Experiment: its cells one after the other on this machine.

Each cell is an ordinary FineTuneJob (`tessera.local.runner.run_job`). After a cell ends, its row
goes to `experiments/<ns>/<name>/cells/<cell>.json` in the store, with a digest of the cell's spec:
a rerun skips every cell whose row says Succeeded for the same spec (a killed run resumes where it
stopped; the cell that was running resumes from its last checkpoint), and reruns failed ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from pydantic import BaseModel

from tessera.api import Experiment, FineTuneJob
from tessera.errors import TesseraError
from tessera.experiment.cells import cell_jobs
from tessera.experiment.report import report_prefix, write_report
from tessera.experiment.results import CellResult, read_cell_result
from tessera.redact import redact
from tessera.store import Store, join_key, open_store

log = logging.getLogger(__name__)


class ExperimentOutcome(BaseModel):
    """What `run_experiment` returns (and `tessera.Client.run_experiment` on the local backend)."""

    experiment: str
    report_uri: str
    report: dict[str, Any]
    ran: list[str]
    skipped: list[str]
    wall_seconds: float


def spec_digest(job: FineTuneJob) -> str:
    return hashlib.sha256(json.dumps(job.spec.to_wire(), sort_keys=True).encode()).hexdigest()


class CellRecords:
    """The experiment's cell rows in the store."""

    def __init__(self, experiment: Experiment) -> None:
        self.store: Store
        self.store, root = open_store(experiment.spec.template.spec.store.uri)
        self.prefix = join_key(root, report_prefix(experiment), "cells")

    def read(self, name: str) -> dict[str, Any] | None:
        key = f"{self.prefix}/{name}.json"
        return self.store.get_json(key) if self.store.exists(key) else None

    def write(self, name: str, digest: str, result: CellResult) -> None:
        record = {"specDigest": digest, "result": result.model_dump(mode="json", by_alias=True)}
        self.store.put_json(f"{self.prefix}/{name}.json", record)

    def finished(self, job: FineTuneJob) -> CellResult | None:
        record = self.read(job.metadata.name)
        if record and record.get("specDigest") == spec_digest(job) and record["result"].get("phase") == "Succeeded":
            return CellResult.model_validate(record["result"])
        return None


def run_experiment(experiment: Experiment, *, show_progress: bool = True) -> ExperimentOutcome:
    """Run every cell not yet finished, then write the report; a failed cell is reported, the others go on."""
    from tqdm import tqdm

    from tessera.local.runner import run_job

    started = time.monotonic()
    records = CellRecords(experiment)
    jobs = cell_jobs(experiment)
    results: list[CellResult] = []
    ran: list[str] = []
    skipped: list[str] = []
    with tqdm(total=len(jobs), desc=f"experiment {experiment.metadata.name}", unit="cell",
              disable=not show_progress, position=0) as bar:
        for cell, job in jobs:
            name = job.metadata.name
            done = records.finished(job)
            if done is not None:
                log.info("cell %s (%s): finished earlier, not rerun", name, cell.describe())
                results.append(done)
                skipped.append(name)
                bar.update(1)
                continue
            bar.set_postfix_str(cell.describe())
            log.info("cell %s (%s)", name, cell.describe())
            cell_started = time.monotonic()
            try:
                run_job(job, show_progress=show_progress)
                result = read_cell_result(job, values=cell.values, repeat=cell.repeat,
                                          wall_seconds=time.monotonic() - cell_started)
            except Exception as error:  # noqa: BLE001 - a failed cell is a row of the report, not the end
                # A TesseraError says what to do; anything else is a bug, whose traceback a person needs.
                log.error("cell %s failed: %s", name, redact(error), exc_info=not isinstance(error, TesseraError))
                result = CellResult(name=name, values=cell.values, repeat=cell.repeat, phase="Failed",
                                    reason=f"{type(error).__name__}: {redact(error)}",
                                    wall_seconds=time.monotonic() - cell_started)
            records.write(name, spec_digest(job), result)
            results.append(result)
            ran.append(name)
            bar.update(1)
    uri, report = write_report(experiment, results)
    log.info("report: %s/report.html", uri)
    return ExperimentOutcome(experiment=experiment.metadata.name, report_uri=uri, report=report, ran=ran,
                             skipped=skipped, wall_seconds=time.monotonic() - started)


def cell_rows(experiment: Experiment) -> list[CellResult]:
    """The rows recorded so far (a cell not yet run is Pending)."""
    records = CellRecords(experiment)
    rows = []
    for cell, job in cell_jobs(experiment):
        record = records.read(job.metadata.name)
        rows.append(CellResult.model_validate(record["result"]) if record else
                    CellResult(name=job.metadata.name, values=cell.values, repeat=cell.repeat, phase="Pending"))
    return rows
