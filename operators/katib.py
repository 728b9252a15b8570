"""An Experiment's `spec.search` on Katib: the operator creates the Katib Experiment (owned by ours) and
mirrors its Trials into our status table; Katib samples, schedules and judges the trials.

Each Trial's object is a FineTuneJob named after the trial, so its row (phase, score, cost, adapter)
comes from that job like a grid cell's; Katib's own observation gives the score while the job's
status does not have it yet.
"""

from __future__ import annotations

from typing import Any

import kopf
from tessera.api import API_VERSION, Experiment
from tessera.experiment.katib import KATIB_API_VERSION, katib_experiment
from tessera.experiment.results import CellResult
from tessera.experiment.status import experiment_status
from tessera_operator.builders import owner_reference
from tessera_operator.kube import Kube

KATIB_GROUP, KATIB_VERSION = KATIB_API_VERSION.split("/")


def _katib_phase(obj: dict[str, Any]) -> str:
    """Katib's conditions as a phase: the last condition that is True."""
    true = [c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    return true[-1] if true else "Created"


def reconcile_search(body: kopf.Body, experiment: Experiment, patch: kopf.Patch, kube: Kube) -> None:
    namespace, name = experiment.metadata.namespace, experiment.metadata.name
    manifest = katib_experiment(experiment, owner_reference(dict(body)))
    custom = kube.custom
    try:
        custom.create_namespaced_custom_object(KATIB_GROUP, KATIB_VERSION, namespace, "experiments", manifest)
        kopf.info(body, reason="KatibExperimentCreated", message=f"Katib Experiment {name} runs the search")
    except Exception as error:  # noqa: BLE001 - 409: created by an earlier pass
        if getattr(error, "status", None) != 409:
            raise kopf.TemporaryError(f"creating the Katib Experiment: {getattr(error, 'reason', error)}",
                                      delay=30) from None
    katib = custom.get_namespaced_custom_object(KATIB_GROUP, KATIB_VERSION, namespace, "experiments", name)
    trials = custom.list_namespaced_custom_object(KATIB_GROUP, KATIB_VERSION, namespace, "trials",
                                                  label_selector=f"katib.kubeflow.org/experiment={name}")
    rows = [_trial_row(trial, experiment, kube) for trial in trials.get("items", [])]
    status = experiment_status(experiment, rows)
    phase = _katib_phase(katib)
    wire = status.to_wire()
    wire["katibExperiment"] = name
    wire["phase"] = {"Succeeded": "Succeeded", "Failed": "Failed"}.get(phase, "Running")
    patch.status.update(wire)


def _trial_row(trial: dict[str, Any], experiment: Experiment, kube: Kube) -> CellResult:
    name = trial["metadata"]["name"]
    values = {a["name"]: a["value"] for a in (trial.get("spec") or {}).get("parameterAssignments") or []}
    job = kube.get(API_VERSION, "FineTuneJob", experiment.metadata.namespace, name) or {}
    status = job.get("status") or {}
    metric = experiment.spec.selection.metric
    observed = {m["name"]: m.get("latest") for m in
                ((trial.get("status") or {}).get("observation") or {}).get("metrics") or []}
    scores = dict((status.get("metrics") or {}).get("adapter") or {})
    if metric not in scores and observed.get(metric) not in (None, "unavailable"):
        scores[metric] = float(observed[metric])
    # Until its FineTuneJob reports a phase, the trial's own conditions say where it is.
    phase = status.get("phase") or {"Succeeded": "Succeeded", "Failed": "Failed", "Running": "Running",
                                    "MetricsUnavailable": "Failed"}.get(_katib_phase(trial), "Pending")
    return CellResult(
        name=name, values=values, phase=phase,
        reason=(status.get("error") or {}).get("message"), adapter_scores=scores,
        adapter_uri=(status.get("adapterRef") or {}).get("uri"), device_hours=status.get("gpuHours"),
        cost=(status.get("cost") or {}).get("amount"),
    )
