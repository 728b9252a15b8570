"""`tessera.Client(namespace=...)`, the Kubernetes backend, against the API emulator: it creates the
Experiment with the kubeconfig's credentials, reads its status as pydantic objects, waits on its phase
and reads the report that the status points at.

Stands in for a cluster: the Kubernetes API emulator of tests/operator (no operator runs here: the
test writes the status an operator would, so only the client is under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tessera import Client
from tessera.api import parse_resource
from tessera.api.experiment import ExperimentStatus
from tessera.client.backends import ClientError

from tests.experiment.conftest import experiment_manifest
from tests.operator.harness import SimulatedCluster

EXP = ("tessera.dev/v1alpha1", "Experiment")


def test_the_kubernetes_backend_creates_waits_and_reads_the_report(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    document = experiment_manifest([{"name": "rank", "path": "lora.rank", "values": [4, 16]}], name="ranks")
    experiment = parse_resource(document)
    client = Client(namespace=namespace)

    created = client.run_experiment(experiment)
    assert created.metadata.namespace == namespace and created.metadata.uid
    stored = cluster.get(*EXP, namespace, "ranks")
    assert stored["spec"]["matrix"]["axes"][0]["values"] == [4, 16]
    assert client.experiment_status("ranks") == ExperimentStatus()  # nothing has run it yet
    with pytest.raises(ClientError, match="still Pending after 0.2 s"):
        client.wait("ranks", timeout=0.2, poll=0.05)
    with pytest.raises(ClientError, match="creating Experiment ranks: HTTP 409"):
        client.run_experiment(experiment)

    report_dir = tmp_path / "experiments" / namespace / "ranks"
    report_dir.mkdir(parents=True)
    (report_dir / "report.json").write_text(json.dumps({"experiment": "ranks", "winner": {"cell": "ranks-1"}}))
    kind = cluster.kind(*EXP)
    cluster.emulator.call(cluster.server.patch(kind, namespace, "ranks", {"status": {
        "phase": "Succeeded", "cellsTotal": 2, "cellsDone": 2, "bestCell": "ranks-1", "bestScore": 0.8,
        "reportUri": f"file://{report_dir}"}}, subresource="status"))

    status = client.wait(experiment, timeout=10, poll=0.05)
    assert isinstance(status, ExperimentStatus)
    assert (status.phase, status.cells_done, status.best_cell) == ("Succeeded", 2, "ranks-1")
    assert client.report("ranks")["winner"]["cell"] == "ranks-1"
