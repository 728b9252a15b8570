"""A cell's FineTuneJob: the template with the cell's paths set, named and labelled after the cell.

The same job object is what the embedded runner runs and what the operator creates, so a cell's
artifacts (`jobs/<ns>/<cell>/`) and adapter (`adapters/<ns>/<cell>/`) sit at the same keys in both.
"""

from __future__ import annotations

import re
from typing import Any

from tessera.api import Experiment, FineTuneJob
from tessera.api.base import ObjectMeta
from tessera.api.experiment import Cell

EXPERIMENT_LABEL = "tessera.dev/experiment"
CELL_LABEL = "tessera.dev/cell"
AXIS_LABEL_PREFIX = "experiment.tessera.dev/"


def label_value(value: Any) -> str:
    """A Kubernetes label value for an axis value (at most 63 characters of [A-Za-z0-9._-])."""
    from tessera.api.experiment import short_value

    text = re.sub(r"[^A-Za-z0-9._-]+", "_", short_value(value))[-63:]
    return text.strip("._-") or "none"


def cell_job(experiment: Experiment, cell: Cell) -> FineTuneJob:
    """The FineTuneJob of one cell; its adapter is named after the job and is never served by the job itself
    (the experiment promotes its winner, and only it)."""
    name = cell.name(experiment.metadata.name)
    spec = experiment.spec.cell_spec(cell).model_copy(deep=True)
    spec.output.adapter_name = name
    spec.serving.enabled = False
    labels = {
        **experiment.spec.template.metadata.labels,
        EXPERIMENT_LABEL: experiment.metadata.name,
        CELL_LABEL: name,
        **{f"{AXIS_LABEL_PREFIX}{axis}": label_value(value) for axis, value in cell.values.items()},
    }
    metadata = ObjectMeta(name=name, namespace=experiment.metadata.namespace, labels=labels,
                          annotations=dict(experiment.spec.template.metadata.annotations))
    return FineTuneJob(metadata=metadata, spec=spec)


def cell_jobs(experiment: Experiment) -> list[tuple[Cell, FineTuneJob]]:
    return [(cell, cell_job(experiment, cell)) for cell in experiment.spec.cells()]
