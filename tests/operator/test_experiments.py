"""Experiments on the simulated cluster: the real operator (`tessera operator`) fans an Experiment out
into one FineTuneJob per cell, never more than `maxParallel` at a time, survives a SIGKILL without
creating a cell twice, reports a failed cell while the rest finish, writes the report and promotes
only the winner.

Stands in for a cluster: the Kubernetes API emulator and the Argo / Training Operator controllers of
tests/operator, which run each step's real `tessera` command as a local process on the tiny model;
the local-directory store stands in for MinIO.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from tests.operator.harness import REPO, SAMPLE_CSV, OperatorProcess, SimulatedCluster

pytestmark = pytest.mark.slow

KUBECTL = REPO / ".tools" / "bin" / "kubectl"
FTJ = ("tessera.dev/v1alpha1", "FineTuneJob")
EXP = ("tessera.dev/v1alpha1", "Experiment")
ADAPTER = ("tessera.dev/v1alpha1", "Adapter")
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def experiment(namespace: str, tiny_model: Path, store: Path, missing: Path) -> dict:
    template = {
        "baseModel": {"uri": str(tiny_model), "name": "tessera/tiny-llama", "quantization": {"bits": None},
                      "computeDtype": "float32"},
        "dataset": {"uri": str(SAMPLE_CSV), "task": "sentiment", "onBadRows": "skip", "maxRows": 48,
                    "maxEvalRows": 8, "labelMap": {"0": "negative", "1": "positive", "2": "neutral"}},
        "training": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 256, "checkpointEverySteps": 1,
                     "loggingSteps": 1},
        "distribution": {"workers": 1, "gpusPerWorker": 0},
        "evaluation": {"maxSamples": 8, "maxNewTokens": 4, "batchSize": 8},
        "serving": {"createInferenceService": False},
        "cost": {"pricePerDeviceHour": 4.0},
        "store": {"uri": str(store)},
    }
    return {
        "apiVersion": "tessera.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": "ranks", "namespace": namespace},
        "spec": {
            "template": {"spec": template},
            "matrix": {
                # Two of the four cells name missing data: their prepare step fails, the others go on.
                "axes": [{"name": "rank", "path": "lora.rank", "values": [2, 4]},
                         {"name": "data", "path": "dataset.uri", "values": [str(SAMPLE_CSV), str(missing)]}],
            },
            "maxParallel": 2,
            "promote": True,
        },
    }


class RunningWatch:
    """Samples the cells' jobs while the experiment runs: the most seen unfinished at once."""

    def __init__(self, cluster: SimulatedCluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            jobs = self.cluster.list(*FTJ, self.namespace)
            running = [j for j in jobs if ((j.get("status") or {}).get("phase") or "Pending") not in TERMINAL]
            self.most = max(self.most, len(running))


def test_experiment_fans_out_within_max_parallel_survives_a_restart_and_promotes_only_the_winner(
    cluster: SimulatedCluster, namespace: str, tiny_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    cluster.create(experiment(namespace, tiny_model, store, tmp_path / "missing.csv"))
    watch = RunningWatch(cluster, namespace)
    watch.thread.start()
    operator = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    try:
        cluster.wait_for("the first two cells", lambda: len(cluster.list(*FTJ, namespace)) >= 2, 60, operator)
        operator.kill()  # SIGKILL with two cells in flight: no cleanup, no chance to record anything
        first_uids = {j["metadata"]["name"]: j["metadata"]["uid"] for j in cluster.list(*FTJ, namespace)}
        operator = OperatorProcess(cluster, [namespace], tmp_path / "operator-2.log").start()

        def finished() -> dict | None:
            status = (cluster.get(*EXP, namespace, "ranks") or {}).get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = cluster.wait_for("the experiment to finish", finished, 400, operator)
    finally:
        watch.stop.set()
        watch.thread.join()
        operator.stop()

    jobs = cluster.list(*FTJ, namespace)
    assert len(jobs) == 4 and len({j["metadata"]["labels"]["tessera.dev/cell"] for j in jobs}) == 4
    # The restarted operator adopted the jobs in flight instead of creating them again.
    assert all({j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs}[n] == uid for n, uid in first_uids.items())
    assert all(j["metadata"]["ownerReferences"][0]["kind"] == "Experiment" for j in jobs)
    assert 1 <= watch.most <= 2

    assert status["phase"] == "Succeeded" and status["cellsTotal"] == 4 and status["cellsDone"] == 4
    rows = {(row["values"]["rank"], row["values"]["data"] == str(SAMPLE_CSV)): row for row in status["cells"]}
    for rank in (2, 4):
        assert rows[rank, False]["phase"] == "Failed" and "missing.csv" in rows[rank, False]["reason"]
        assert rows[rank, True]["phase"] == "Succeeded"
        assert rows[rank, True]["adapterUri"] and rows[rank, True]["cost"] > 0
    winner = status["winner"]["cell"]
    assert winner in {rows[2, True]["name"], rows[4, True]["name"]} and status["bestCell"] == winner

    # Only the winner is served; the others are published, not promoted.
    adapters = cluster.list(*ADAPTER, namespace)
    assert [a["metadata"]["name"] for a in adapters] == [winner]
    assert adapters[0]["spec"]["lineage"]["job"] == f"{namespace}/{winner}"
    assert not adapters[0]["metadata"].get("ownerReferences")

    report = json.loads((store / "experiments" / namespace / "ranks" / "report.json").read_text())
    assert report["winner"]["cell"] == winner
    assert status["reportUri"].endswith(f"experiments/{namespace}/ranks")
    shown = subprocess.run([str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig), "get", "ftx", "-n", namespace],
                           capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert shown[:8] == ["NAME", "PHASE", "DONE", "TOTAL", "BEST", "SCORE", "COST", "AGE"]
    assert shown[8:13] == ["ranks", "Succeeded", "4", "4", winner]
    reasons = {(e["type"], e["reason"]) for e in cluster.events(namespace, "ranks")}
    assert {("Normal", "CellStarted"), ("Warning", "CellFailed"), ("Normal", "WinnerPromoted")} <= reasons

    # Deleting the experiment deletes its jobs (the garbage collector follows their owner references; the
    # operator's finalizer removes each job's store prefix), not the adapter it promoted.
    operator = OperatorProcess(cluster, [namespace], tmp_path / "operator-3.log").start()
    try:
        cluster.emulator.call(cluster.server.delete(cluster.kind(*EXP), namespace, "ranks"))
        cluster.wait_for("the cell jobs to be collected", lambda: not cluster.list(*FTJ, namespace), 60, operator)
    finally:
        operator.stop()
    assert [a["metadata"]["name"] for a in cluster.list(*ADAPTER, namespace)] == [winner]
    assert not (store / "jobs" / namespace / winner).exists()
    assert Path(adapters[0]["spec"]["uri"].removeprefix("file://")).is_dir()


def katib_crd(plural: str, kind: str) -> dict:
    """Katib's CRDs as upstream ships them: an open schema (x-kubernetes-preserve-unknown-fields)."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kubeflow.org"},
            "spec": {"group": "kubeflow.org", "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": "v1beta1", "served": True, "storage": True,
                                   "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                                                  "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_a_search_becomes_a_katib_experiment_whose_trials_fill_the_table(tiny_model: Path, tmp_path: Path) -> None:
    """Katib is played by the test: it adds a Trial with Katib's observation and ends the Katib Experiment."""
    (tmp_path / "katib-cluster").mkdir()
    cluster = SimulatedCluster(tmp_path / "katib-cluster", controllers=False)
    namespace = "team-k"
    try:
        cluster.server.register_crds([katib_crd("experiments", "Experiment"), katib_crd("trials", "Trial")])
        document = experiment(namespace, tiny_model, tmp_path / "store", tmp_path / "missing.csv")
        document["metadata"]["name"] = "search"
        document["spec"]["matrix"] = {"axes": [{"name": "rank", "path": "lora.rank", "values": [4, 8, 16]}]}
        document["spec"]["search"] = {"algorithm": "tpe", "maxTrials": 6}
        cluster.create(document)
        operator = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
        try:
            katib = cluster.wait_for("the Katib Experiment", lambda: cluster.get(
                "kubeflow.org/v1beta1", "Experiment", namespace, "search"), 60, operator)
            assert katib["spec"]["algorithm"] == {"algorithmName": "tpe"}
            assert katib["spec"]["parallelTrialCount"] == 2
            assert katib["metadata"]["ownerReferences"][0]["kind"] == "Experiment"
            assert katib["metadata"]["ownerReferences"][0]["apiVersion"] == "tessera.dev/v1alpha1"
            cluster.create({
                "apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
                "metadata": {"name": "search-x7k2p", "namespace": namespace,
                             "labels": {"katib.kubeflow.org/experiment": "search"}},
                "spec": {"parameterAssignments": [{"name": "rank", "value": "8"}]},
            })
            trials = cluster.kind("kubeflow.org/v1beta1", "Trial")
            cluster.emulator.call(cluster.server.patch(trials, namespace, "search-x7k2p", {"status": {
                "conditions": [{"type": "Succeeded", "status": "True"}],
                "observation": {"metrics": [{"name": "accuracy", "latest": "0.8125"}]}}}, subresource="status"))
            experiments = cluster.kind("kubeflow.org/v1beta1", "Experiment")
            cluster.emulator.call(cluster.server.patch(experiments, namespace, "search", {"status": {
                "conditions": [{"type": "Succeeded", "status": "True"}]}}, subresource="status"))

            def mirrored() -> dict | None:
                status = (cluster.get(*EXP, namespace, "search") or {}).get("status") or {}
                return status if status.get("phase") == "Succeeded" else None

            status = cluster.wait_for("the trials mirrored", mirrored, 60, operator)
        finally:
            operator.stop()
    finally:
        cluster.stop()
    assert status["katibExperiment"] == "search"
    assert [(c["name"], c["values"], c["phase"], c["score"]) for c in status["cells"]] == [
        ("search-x7k2p", {"rank": "8"}, "Succeeded", 0.8125)]
    assert status["bestCell"] == "search-x7k2p"
