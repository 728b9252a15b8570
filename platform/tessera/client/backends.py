"""The two backends of `tessera.Client`: this machine (the embedded runner) and a Kubernetes cluster."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from tessera.api import GROUP, VERSION, Experiment, FineTuneJob, parse_resource
from tessera.api.experiment import ExperimentStatus
from tessera.api.records import RunOutcome
from tessera.errors import TesseraError

TERMINAL = ("Succeeded", "Failed")


class ClientError(TesseraError):
    """The backend could not do what was asked (the message says why; it never carries a credential)."""


class Backend(Protocol):
    def fine_tune(self, job: FineTuneJob, **options: Any) -> FineTuneJob: ...
    def run_experiment(self, experiment: Experiment, **options: Any) -> Any: ...
    def experiment_status(self, experiment: Experiment | str) -> ExperimentStatus: ...
    def wait(self, experiment: Experiment | str, *, timeout: float, poll: float) -> ExperimentStatus: ...
    def report(self, name: str, *, namespace: str | None, store: str | None) -> dict[str, Any]: ...


class LocalBackend:
    """Everything on this machine, with the store each resource names (default `.tessera/store`)."""

    def __init__(self, store: str = ".tessera/store") -> None:
        self.store = store
        self._known: dict[str, Experiment] = {}

    def fine_tune(self, job: FineTuneJob, **options: Any) -> FineTuneJob:
        from tessera.local.runner import run_job

        outcome = run_job(job, **options)
        done = job.model_copy(deep=True)
        done.status = _succeeded_job_status(outcome)
        return done

    def run_experiment(self, experiment: Experiment, **options: Any) -> Any:
        from tessera.local.experiment import run_experiment

        self._known[experiment.metadata.name] = experiment
        return run_experiment(experiment, **options)

    def _experiment(self, experiment: Experiment | str) -> Experiment:
        if isinstance(experiment, Experiment):
            return experiment
        if experiment not in self._known:
            raise ClientError(f"experiment {experiment!r} was not run by this client: pass the Experiment itself")
        return self._known[experiment]

    def experiment_status(self, experiment: Experiment | str) -> ExperimentStatus:
        from tessera.experiment.status import experiment_status
        from tessera.local.experiment import cell_rows

        resolved = self._experiment(experiment)
        return experiment_status(resolved, cell_rows(resolved))

    def wait(self, experiment: Experiment | str, *, timeout: float, poll: float) -> ExperimentStatus:
        # The local backend runs an experiment to its end inside run_experiment: nothing to wait for.
        return self.experiment_status(experiment)

    def report(self, name: str, *, namespace: str | None, store: str | None) -> dict[str, Any]:
        from tessera.experiment.report import read_report

        return read_report(store or self.store, namespace or "default", name)


class KubernetesBackend:
    """The cluster of the kubeconfig (or the pod's service account): creates the resources, reads their status."""

    def __init__(self, namespace: str, *, api_client: Any = None) -> None:
        self.namespace = namespace
        self._api_client = api_client

    @property
    def api(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            try:
                # KUBECONFIG as it is now: the kubernetes client reads it once, when first imported.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except Exception:  # noqa: BLE001 - not on a laptop: the pod's service account
                config.load_incluster_config()
            self._api_client = client.ApiClient()
        return client.CustomObjectsApi(self._api_client)

    def _create(self, plural: str, resource: FineTuneJob | Experiment) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        body = resource.to_manifest()
        body["metadata"]["namespace"] = self.namespace
        try:
            return self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)
        except ApiException as error:
            raise ClientError(f"creating {resource.kind} {resource.metadata.name}: HTTP {error.status} "
                              f"{error.reason}") from None

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            raise ClientError(f"reading {plural}/{name}: HTTP {error.status} {error.reason}") from None

    def fine_tune(self, job: FineTuneJob, **options: Any) -> FineTuneJob:
        return parse_resource(self._create("finetunejobs", job))  # type: ignore[return-value]

    def run_experiment(self, experiment: Experiment, **options: Any) -> Experiment:
        return parse_resource(self._create("experiments", experiment))  # type: ignore[return-value]

    def experiment_status(self, experiment: Experiment | str) -> ExperimentStatus:
        name = experiment if isinstance(experiment, str) else experiment.metadata.name
        return ExperimentStatus.model_validate(self._get("experiments", name).get("status") or {})

    def wait(self, experiment: Experiment | str, *, timeout: float, poll: float) -> ExperimentStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.experiment_status(experiment)
            if status.phase in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise ClientError(f"the experiment is still {status.phase} after {timeout:g} s "
                                  f"({status.cells_done}/{status.cells_total} cells done)")
            time.sleep(poll)

    def report(self, name: str, *, namespace: str | None, store: str | None) -> dict[str, Any]:
        from tessera.experiment.report import read_report

        status = self.experiment_status(name)
        if not status.report_uri:
            raise ClientError(f"experiment {name} has no report yet ({status.phase})")
        return read_report(status.report_uri)


def _succeeded_job_status(outcome: RunOutcome) -> Any:
    from tessera.api.finetunejob import FineTuneJobStatus, JobMetrics, ObjectRef

    training = outcome.training
    scores = outcome.evaluation.adapter if outcome.evaluation else {}
    numbers = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return FineTuneJobStatus(
        phase="Succeeded", trained_tokens=training.trained_tokens, gpu_hours=training.device_hours,
        metrics=JobMetrics(train_loss=training.train_loss, eval_loss=numbers.get("eval_loss"), adapter=numbers),
        adapter_ref=ObjectRef(name=outcome.published.name, uri=outcome.adapter_uri),
    )
