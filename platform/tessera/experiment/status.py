"""An Experiment's status from its cells' rows: the table `kubectl get ftx -o yaml` shows and the
embedded `tessera experiment status` prints (one function for both)."""

from __future__ import annotations

from tessera.api import Experiment
from tessera.api.experiment import CellStatus, ExperimentStatus, Winner
from tessera.experiment.results import CellResult
from tessera.experiment.selection import select

FINISHED = ("Succeeded", "Failed", "Cancelled")


def experiment_status(
    experiment: Experiment, results: list[CellResult], report_uri: str | None = None
) -> ExperimentStatus:
    metric = experiment.spec.selection.metric
    cells = [
        CellStatus(name=r.name, values=r.values, repeat=r.repeat, phase=r.phase, score=r.score(metric), cost=r.cost,
                   device_hours=r.device_hours, wall_seconds=r.wall_seconds, adapter_uri=r.adapter_uri, reason=r.reason)
        for r in results
    ]
    done = [r for r in results if r.phase in FINISHED]
    choice = select([r for r in results if r.phase == "Succeeded"], experiment.spec.selection) if done else None
    best = choice.winner if choice else None
    finished = len(done) == len(results)
    status = ExperimentStatus(
        phase=("Failed" if finished and best is None else "Succeeded") if finished else
        ("Running" if any(r.phase != "Pending" for r in results) else "Pending"),
        cells_total=len(results),
        cells_done=len(done),
        cells=cells,
        best_cell=best.best_cell if best else None,
        best_score=best.score if best else None,
        cost_so_far=round(sum(r.cost or 0.0 for r in results), 6),
        currency=experiment.spec.template.spec.cost.currency,
        report_uri=report_uri,
    )
    if finished and best and choice:
        status.winner = Winner(cell=best.best_cell or best.cells[0], score=best.score, adapter_uri=best.adapter_uri,
                               reason=choice.reason)
    elif finished:
        status.message = choice.reason if choice else "no cell finished"
    return status
