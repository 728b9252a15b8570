"""`tessera.Client`: one Python API over two backends, as the Kubeflow SDK's `TrainerClient`.

    from tessera import Client
    c = Client()                      # embedded: runs on this machine, the local-directory store
    c = Client(namespace="team-a")    # Kubernetes: the kubeconfig's cluster, the operator does the work

Both backends take and return the API's pydantic objects; the CLI is built on this class.
"""

from __future__ import annotations

from typing import Any

from tessera.api import Experiment, FineTuneJob
from tessera.api.experiment import ExperimentStatus
from tessera.client.backends import Backend, KubernetesBackend, LocalBackend


class Client:
    """Fine-tune, run experiments, wait for them and read their reports, locally or on a cluster."""

    def __init__(self, namespace: str | None = None, *, backend: Backend | None = None) -> None:
        self.backend = backend or (KubernetesBackend(namespace) if namespace else LocalBackend())

    def fine_tune(self, job: FineTuneJob, **options: Any) -> FineTuneJob:
        """Start (Kubernetes) or run (local) a FineTuneJob; returns it with its status."""
        return self.backend.fine_tune(job, **options)

    def run_experiment(self, experiment: Experiment, **options: Any) -> Any:
        """Start (Kubernetes) or run to the end (local) an Experiment."""
        return self.backend.run_experiment(experiment, **options)

    def experiment_status(self, experiment: Experiment | str) -> ExperimentStatus:
        return self.backend.experiment_status(experiment)

    def wait(self, experiment: Experiment | str, *, timeout: float = 3600, poll: float = 5) -> ExperimentStatus:
        """Block until the experiment succeeds or fails; returns its last status."""
        return self.backend.wait(experiment, timeout=timeout, poll=poll)

    def report(self, name: str, *, namespace: str | None = None, store: str | None = None) -> dict[str, Any]:
        """The experiment's comparison report (the JSON written beside it in the store)."""
        return self.backend.report(name, namespace=namespace, store=store)


__all__ = ["Client", "KubernetesBackend", "LocalBackend"]
