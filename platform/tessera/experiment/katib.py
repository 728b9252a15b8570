"""Katib for `spec.search`: the Katib Experiment (`kubeflow.org/v1beta1`) whose trials are FineTuneJobs,
and the metric push the evaluate step makes when Katib names the trial (`KATIB_TRIAL_NAME`).

Katib substitutes `${trialParameters.x}` into the trial template as text, so the trial's values go
into one JSON annotation of the FineTuneJob (numbers stay numbers there) that the API applies to the
spec (`tessera.api.experiment.trial_overrides`). Trials succeed or fail with the FineTuneJob's
phase; the metrics arrive by Katib's Push collector.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from tessera.api import Experiment
from tessera.api.experiment import TRIAL_PARAMETERS_ANNOTATION, Axis
from tessera.api.records import EvaluationReport
from tessera.errors import TesseraError
from tessera.experiment.cells import EXPERIMENT_LABEL

log = logging.getLogger(__name__)

KATIB_API_VERSION = "kubeflow.org/v1beta1"
TRIAL_NAME_ENV = "KATIB_TRIAL_NAME"
DB_MANAGER_ENV = "TESSERA_KATIB_DB_MANAGER"
# Katib's mutating webhook gives the trial's name to this container of these pods: the workflow's steps.
PRIMARY_CONTAINER = "main"
PRIMARY_POD_LABELS = {"tessera.dev/step": "pipeline"}


class KatibPushError(TesseraError):
    """Katib named this job as a trial but its DB manager did not take the metrics (the trial would
    end without an observation)."""


def _parameter(axis: Axis) -> dict[str, Any]:
    """Katib's ParameterSpec for an axis: a list of values, or a numeric range."""
    if axis.values is not None:
        numeric = all(isinstance(v, (int, float)) for v in axis.values)
        return {"name": axis.name, "parameterType": "discrete" if numeric else "categorical",
                "feasibleSpace": {"list": [str(v) for v in axis.values]}}
    integral = all(float(b).is_integer() for b in (axis.min, axis.max)) and (axis.step or 1).is_integer()
    space: dict[str, Any] = {"min": _number(axis.min, integral), "max": _number(axis.max, integral)}
    if axis.step is not None:
        space["step"] = _number(axis.step, integral)
    if axis.distribution is not None:
        space["distribution"] = axis.distribution
    return {"name": axis.name, "parameterType": "int" if integral else "double", "feasibleSpace": space}


def _number(value: float | None, integral: bool) -> str:
    return str(int(value)) if integral and value is not None else str(value)


def _placeholder(axis: Axis) -> str:
    numeric = axis.values is None or all(isinstance(v, (int, float)) for v in axis.values)
    token = f"${{trialParameters.{axis.name}}}"
    return token if numeric else json.dumps(token)


def katib_experiment(experiment: Experiment, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Katib Experiment that runs `experiment.spec.search` with FineTuneJobs as its trials."""
    spec, search = experiment.spec, experiment.spec.search
    assert search is not None, "only an Experiment with spec.search runs on Katib"
    axes = spec.matrix.axes
    template = spec.template.spec.model_copy(deep=True)
    template.serving.enabled = False
    # The annotation's JSON is written as text so that a numeric placeholder stays unquoted.
    overrides = "{" + ", ".join(f"{json.dumps(a.path)}: {_placeholder(a)}" for a in axes) + "}"
    trial_spec = {
        "apiVersion": experiment.api_version,
        "kind": "FineTuneJob",
        "metadata": {
            "labels": {**spec.template.metadata.labels, EXPERIMENT_LABEL: experiment.metadata.name},
            "annotations": {**spec.template.metadata.annotations, TRIAL_PARAMETERS_ANNOTATION: overrides},
        },
        "spec": template.to_wire(),
    }
    metadata: dict[str, Any] = {"name": experiment.metadata.name, "namespace": experiment.metadata.namespace,
                                "labels": {EXPERIMENT_LABEL: experiment.metadata.name}}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    other_metrics = [m for m in ("accuracy", "f1_weighted", "eval_loss") if m != spec.selection.metric]
    return {
        "apiVersion": KATIB_API_VERSION,
        "kind": "Experiment",
        "metadata": metadata,
        "spec": {
            "objective": {"type": "maximize" if spec.selection.maximize else "minimize",
                          "objectiveMetricName": spec.selection.metric,
                          "additionalMetricNames": other_metrics},
            "algorithm": {"algorithmName": search.algorithm},
            "parallelTrialCount": spec.max_parallel,
            "maxTrialCount": search.max_trials,
            "maxFailedTrialCount": search.max_failed_trials if search.max_failed_trials is not None
            else search.max_trials,
            "metricsCollectorSpec": {"collector": {"kind": "Push"}},
            "parameters": [_parameter(a) for a in axes],
            "trialTemplate": {
                "primaryContainerName": PRIMARY_CONTAINER,
                "primaryPodLabels": dict(PRIMARY_POD_LABELS),
                "successCondition": 'status.[@this].#(phase=="Succeeded")#',
                "failureCondition": 'status.[@this].#(phase=="Failed")#',
                "trialParameters": [{"name": a.name, "reference": a.name,
                                     "description": f"spec.{a.path} of the trial's FineTuneJob"} for a in axes],
                "trialSpec": trial_spec,
            },
        },
    }


def push_metrics(report: EvaluationReport) -> dict[str, float] | None:
    """Report the adapter's held-out metrics to Katib's DB manager, when Katib runs this job as a trial.

    Uses the `kubeflow-katib` SDK's `report_metrics` (the Push collector's client). Returns what was
    pushed, or None when this is not a trial."""
    env = os.environ  # the SDK reads KATIB_TRIAL_NAME from the environment itself
    if not env.get(TRIAL_NAME_ENV):
        return None
    from kubeflow.katib import report_metrics

    metrics = {k: float(v) for k, v in report.adapter.items()
               if k in ("accuracy", "f1_weighted", "eval_loss", "mse", "rouge1", "rougeL", "binary_accuracy")
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    address = env.get(DB_MANAGER_ENV)
    try:
        if address:
            report_metrics(metrics, db_manager_address=address)
        else:
            report_metrics(metrics)
    except (RuntimeError, ValueError, OSError) as error:
        raise KatibPushError(f"reporting the metrics to Katib failed: {error}") from None
    log.info("reported %s to Katib for trial %s", ", ".join(sorted(metrics)), env[TRIAL_NAME_ENV])
    return metrics
