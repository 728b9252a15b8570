"""The operator (`tessera operator`, a real kopf process) against the simulated cluster.

Stands in for a cluster: the Kubernetes API emulator (kmock, extended) and test-side controllers
that play Argo, the Training Operator and KServe by running the pods' real commands locally
(see emulator.py and controllers.py). Steps run the real `tessera prepare/train/...` CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from tests.operator.harness import REPO, OperatorProcess, SimulatedCluster, finetunejob

KUBECTL = REPO / ".tools" / "bin" / "kubectl"
FTJ = ("tessera.dev/v1alpha1", "FineTuneJob")
WORKFLOW = ("argoproj.io/v1alpha1", "Workflow")


def status_of(cluster: SimulatedCluster, namespace: str, name: str) -> dict[str, Any]:
    return (cluster.job(namespace, name) or {}).get("status") or {}


def phase_is(cluster: SimulatedCluster, namespace: str, name: str, *phases: str):
    return lambda: status_of(cluster, namespace, name).get("phase") in phases


def reasons(cluster: SimulatedCluster, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in cluster.events(namespace, name)]


def missing_dataset_job(name: str, namespace: str, tmp_path: Path) -> dict[str, Any]:
    """A valid spec whose prepare step fails fast (the dataset file is not there)."""
    return finetunejob(name, namespace, str(tmp_path / "no-model"), str(tmp_path / "store"),
                       dataset={"uri": str(tmp_path / "missing.csv")})


def test_invalid_job_fails_with_invalid_spec_and_never_blocks_the_others(cluster, namespace, operator, tmp_path):
    # Passes the CRD schema (the API server accepts it) but breaks a cross-field rule of the API.
    invalid = missing_dataset_job("needs-a-secret", namespace, tmp_path)
    invalid["spec"]["dataset"]["uri"] = "s3://tessera/datasets/fpb.csv"
    cluster.create(invalid)
    cluster.create(missing_dataset_job("valid", namespace, tmp_path))

    cluster.wait_for("the invalid job to fail", phase_is(cluster, namespace, "needs-a-secret", "Failed"), 60,
                     operator)
    status = status_of(cluster, namespace, "needs-a-secret")
    assert status["error"]["code"] == "InvalidSpec"
    assert "spec.store.credentialsSecret" in status["error"]["message"]
    assert {"type": "SpecValid", "status": "False", "reason": "InvalidSpec"}.items() <= \
        next(c for c in status["conditions"] if c["type"] == "SpecValid").items()
    assert ("Warning", "InvalidSpec") in reasons(cluster, namespace, "needs-a-secret")
    assert cluster.get(*WORKFLOW, namespace, "ftj-needs-a-secret") is None

    # The valid job next to it was submitted and ran its first step.
    cluster.wait_for("the valid job to run", phase_is(cluster, namespace, "valid", "Failed"), 60, operator)
    assert status_of(cluster, namespace, "valid")["error"]["code"] == "PrepareFailed"
    assert cluster.get(*WORKFLOW, namespace, "ftj-valid") is not None

    # Fixing the invalid job's spec submits it: it never ran, so the change is not refused.
    fixed = {"spec": {"dataset": {"uri": str(tmp_path / "missing.csv")}}}
    kind = cluster.kind(*FTJ)
    cluster.emulator.call(cluster.server.patch(kind, namespace, "needs-a-secret", fixed))
    cluster.wait_for("the fixed job to be submitted",
                     lambda: status_of(cluster, namespace, "needs-a-secret").get("workflowRef"), 60, operator)
    assert status_of(cluster, namespace, "needs-a-secret")["observedGeneration"] == 2


def test_a_missing_credentials_secret_is_said_and_the_job_starts_once_it_exists(cluster, namespace, operator,
                                                                                 tmp_path):
    """Without its Secret no step could start: the job says so (Pending, CredentialsReady=False, a Warning
    Event) instead of sitting Queued, creates no Workflow, and is submitted once the Secret exists."""
    job = missing_dataset_job("no-secret", namespace, tmp_path)
    job["spec"]["store"]["credentialsSecret"] = "team-store"
    cluster.create(job)

    def credentials(expected: str) -> dict[str, Any] | None:
        found = [c for c in status_of(cluster, namespace, "no-secret").get("conditions") or []
                 if c["type"] == "CredentialsReady" and c["status"] == expected]
        return found[0] if found else None

    cluster.wait_for("CredentialsReady=False", lambda: credentials("False"), 60, operator)
    status = status_of(cluster, namespace, "no-secret")
    assert status["phase"] == "Pending" and not status.get("workflowRef")
    assert credentials("False")["reason"] == "SecretNotFound"
    assert "Secret team-store" in credentials("False")["message"]
    assert ("Warning", "SecretNotFound") in reasons(cluster, namespace, "no-secret")
    assert cluster.get(*WORKFLOW, namespace, "ftj-no-secret") is None

    cluster.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "team-store", "namespace": namespace}, "data": {}})
    cluster.wait_for("the job to be submitted once the Secret exists",
                     lambda: status_of(cluster, namespace, "no-secret").get("workflowRef"), 90, operator)
    assert credentials("True") is not None
    assert cluster.get(*WORKFLOW, namespace, "ftj-no-secret") is not None


def test_failing_train_step_fails_the_job_with_a_reason_and_an_event(cluster, namespace, operator, tiny_model,
                                                                      tmp_path):
    # Prepare accepts it; PEFT finds no such module when the trainer starts.
    # No restarts: the same error would come back on every one.
    job = finetunejob("bad-modules", namespace, str(tiny_model), str(tmp_path / "store"),
                      lora={"rank": 4, "targetModules": ["no_such_proj"]}, distribution={"maxRestarts": 0})
    cluster.create(job)
    cluster.wait_for("the job to fail", phase_is(cluster, namespace, "bad-modules", "Failed"), 180, operator)
    status = status_of(cluster, namespace, "bad-modules")
    assert status["error"]["code"] == "TrainingFailed", status["error"]
    assert "reached the specified backoff limit" in status["error"]["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["DataPrepared"]["status"] == "True"
    assert conditions["Trained"]["status"] == "False" and conditions["Trained"]["reason"] == "TrainingFailed"
    assert ("Warning", "TrainingFailed") in reasons(cluster, namespace, "bad-modules")
    pytorchjob = cluster.get("kubeflow.org/v1", "PyTorchJob", namespace, "ftj-bad-modules-train")
    assert pytorchjob["status"]["replicaStatuses"]["Master"]["failed"] == 1
    workflow = cluster.get(*WORKFLOW, namespace, "ftj-bad-modules")
    assert workflow["status"]["phase"] == "Failed"
    assert {n["displayName"] for n in workflow["status"]["nodes"].values()} >= {"prepare", "train"}
    assert "evaluate" not in {n["displayName"] for n in workflow["status"]["nodes"].values()}


class StatusWritesFail:
    """Fault injection: the API server answers 503 to status writes of one job while `failing` is set."""

    def __init__(self, cluster: SimulatedCluster, namespace: str, name: str) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.refused = 0
        path = f"/apis/tessera.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status"

        def react(request: kmock.Request) -> Any:
            if not self.failing.is_set():
                return NotImplemented  # retire this reaction: the real handler answers from now on
            self.refused += 1
            return kmock.Response(status=503, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                       "reason": "ServiceUnavailable", "code": 503})

        cluster.emulator.run(lambda: cluster.server[f"patch {path}"] << react)


def test_operator_killed_after_creating_the_workflow_makes_no_duplicate_and_loses_no_status(
        cluster, namespace, tmp_path):
    log = tmp_path / "operator.log"
    fault = StatusWritesFail(cluster, namespace, "restarted")
    first = OperatorProcess(cluster, [namespace], log).start()
    try:
        cluster.create(missing_dataset_job("restarted", namespace, tmp_path))
        workflow_kind = cluster.kind(*WORKFLOW)
        cluster.wait_for("the Workflow to be created and its status write refused",
                         lambda: cluster.get(*WORKFLOW, namespace, "ftj-restarted") and fault.refused, 60, first)
        assert "workflowRef" not in status_of(cluster, namespace, "restarted")
    finally:
        first.kill()  # SIGKILL between creating the Workflow and recording it
    fault.failing.clear()

    second = OperatorProcess(cluster, [namespace], log).start()
    try:
        cluster.wait_for("the restarted operator to finish the job",
                         phase_is(cluster, namespace, "restarted", "Failed"), 60, second)
        status = status_of(cluster, namespace, "restarted")
        assert status["workflowRef"] == {"name": "ftj-restarted"}
        assert status["error"]["code"] == "PrepareFailed"
        assert cluster.emulator.run(lambda: cluster.server.created_count(workflow_kind, namespace,
                                                                          "ftj-restarted")) == 1
        assert len([w for w in cluster.list(*WORKFLOW, namespace)]) == 1
        submitted = next(c for c in status["conditions"] if c["type"] == "Submitted")

        # A third start finds a finished job: nothing is created again and the status stays as it was.
        second.kill()
        third = OperatorProcess(cluster, [namespace], tmp_path / "third.log").start()
        try:
            cluster.wait_for("the third operator to resume the job",
                             lambda: "Handler 'submit' succeeded" in third.log_tail(400), 30, third)
            assert status_of(cluster, namespace, "restarted") == status
            assert next(c for c in status["conditions"] if c["type"] == "Submitted") == submitted
        finally:
            third.stop()
    finally:
        second.stop()
    assert cluster.emulator.run(lambda: cluster.server.created_count(workflow_kind, namespace, "ftj-restarted")) == 1

    # Deleting the job garbage-collects what it owns, once an operator has removed its store prefix
    # (the job's finalizer).
    fourth = OperatorProcess(cluster, [namespace], tmp_path / "fourth.log").start()
    try:
        cluster.emulator.call(cluster.server.delete(cluster.kind(*FTJ), namespace, "restarted"))
        cluster.wait_for("the Workflow and ConfigMap to be collected",
                         lambda: cluster.get(*WORKFLOW, namespace, "ftj-restarted") is None
                         and cluster.get("v1", "ConfigMap", namespace, "ftj-restarted") is None, 30, fourth)
    finally:
        fourth.stop()


def test_transient_api_errors_are_retried_and_spec_changes_after_submission_refused(cluster, namespace, operator,
                                                                                    tmp_path):
    calls = {"refused": 0}
    path = f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/workflows"

    def flaky(request: kmock.Request) -> Any:
        if calls["refused"] >= 2:
            return NotImplemented
        calls["refused"] += 1
        return kmock.Response(status=503, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "reason": "ServiceUnavailable", "code": 503})

    cluster.emulator.run(lambda: cluster.server[f"post {path}"] << flaky)
    cluster.create(missing_dataset_job("flaky", namespace, tmp_path))
    cluster.wait_for("the job to be submitted despite two 503s",
                     lambda: status_of(cluster, namespace, "flaky").get("workflowRef"), 60, operator)
    assert calls["refused"] == 2
    assert [w["metadata"]["name"] for w in cluster.list(*WORKFLOW, namespace)] == ["ftj-flaky"]

    kind = cluster.kind(*FTJ)
    cluster.emulator.call(cluster.server.patch(kind, namespace, "flaky", {"spec": {"lora": {"rank": 16}}}))
    cluster.wait_for("the change to be refused", lambda: any(
        c["type"] == "SpecChangeRefused" for c in status_of(cluster, namespace, "flaky").get("conditions", [])),
        30, operator)
    job = cluster.job(namespace, "flaky")
    refused = next(c for c in job["status"]["conditions"] if c["type"] == "SpecChangeRefused")
    assert refused["status"] == "True" and "spec.lora.rank" in refused["message"]
    assert job["metadata"]["generation"] == 2 and job["status"]["observedGeneration"] == 1
    assert ("Warning", "SpecChangeRefused") in reasons(cluster, namespace, "flaky")
    frozen = yaml.safe_load(cluster.get("v1", "ConfigMap", namespace, "ftj-flaky")["data"]["job.yaml"])
    assert frozen["spec"]["lora"]["rank"] == 4  # the job goes on with the spec it was submitted with


def kubectl(cluster: SimulatedCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})


@pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl is fetched by scripts/setup.sh into .tools/bin")
def test_kubectl_applies_the_examples_and_lists_jobs_with_their_phase(cluster, namespace, operator):
    # The job example names no namespace; the adapter example is in `default` (not watched here).
    for example, where in (("tfns-sentiment.yaml", namespace), ("adapter.yaml", "default")):
        done = kubectl(cluster, "apply", "-n", where, "-f", str(REPO / "examples" / example))
        assert done.returncode == 0, done.stderr
        assert "created" in done.stdout
    again = kubectl(cluster, "apply", "-n", namespace, "-f", str(REPO / "examples" / "tfns-sentiment.yaml"))
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr

    # The operator picks the job up (its relative paths do not exist in the pods: prepare fails).
    cluster.wait_for("the example job to get a phase", lambda: status_of(cluster, namespace, "tfns-sentiment")
                     .get("phase") not in (None, "Pending"), 60, operator)
    listed = kubectl(cluster, "get", "finetunejobs", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "ADAPTER", "AGE"]
    assert row.split()[0] == "tfns-sentiment"
    assert row.split()[1] == status_of(cluster, namespace, "tfns-sentiment")["phase"]

    short = kubectl(cluster, "get", "ftj", "tfns-sentiment", "-n", namespace, "-o", "json")
    assert short.returncode == 0 and json.loads(short.stdout)["spec"]["dataset"]["task"] == "sentiment"
    adapters = kubectl(cluster, "get", "lora", "-n", "default", "-o", "name")
    assert adapters.stdout.split() == ["adapter.tessera.dev/fpb-sentiment-external"]

    # The API server refuses what the CRD schema forbids, with the field named.
    bad = yaml.safe_load((REPO / "examples" / "tfns-sentiment.yaml").read_text())
    bad["metadata"]["name"] = "rank-too-high"
    bad["spec"]["lora"]["rank"] = 1000
    refused = subprocess.run([str(KUBECTL), "apply", "-n", namespace, "-f", "-"], input=yaml.safe_dump(bad),
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})
    assert refused.returncode != 0 and "spec.lora.rank" in refused.stderr

    deleted = kubectl(cluster, "delete", "ftj", "tfns-sentiment", "-n", namespace, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
