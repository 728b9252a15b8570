"""A namespace is a tenant: issue 24's holes, tried by a tenant with the `edit` role in its own
namespace, each refused by the real operator with a reason in status and a Warning Event, and
nothing of the other tenant read, written or served.

Stands in for a cluster: the Kubernetes API emulator (tests/operator/emulator.py) WITHOUT the
simulated Argo/KServe controllers: what is under test is what the operator decides, reads and
writes, so no step runs. Every request the operator makes is recorded, to show what it never asked
for (another namespace's Secret). The store is a local directory with the store layout, listed as
the installation's only store root (as the chart lists `store.uri`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from tests.operator.flood import HangingReplica, flooding_adapters, serve_on_hanging_replica
from tests.operator.harness import OperatorProcess, SimulatedCluster, finetunejob

FTJ = ("tessera.dev/v1alpha1", "FineTuneJob")
ADAPTER = ("tessera.dev/v1alpha1", "Adapter")
ISVC = ("serving.kserve.io/v1beta1", "InferenceService")
WORKFLOW = ("argoproj.io/v1alpha1", "Workflow")
CONFIGMAP = ("v1", "ConfigMap")
SETTINGS = {"TESSERA_MAX_INFERENCE_SERVICES": "2", "TESSERA_MAX_NAMESPACE_OPERATIONS": "2",
            "TESSERA_MAX_WORKERS": "4", "TESSERA_ADAPTER_LOAD_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimulatedCluster, Path, list[str],
                                                                      OperatorProcess]]:
    """The emulator, the store root, a list that `watch` fills, and the operator."""
    root = tmp_path_factory.mktemp("tenancy")
    cluster = SimulatedCluster(root, controllers=False)
    requests: list[str] = []
    store = root / "store"
    store.mkdir()
    operator = OperatorProcess(cluster, [], root / "operator.log",
                               {**SETTINGS, "TESSERA_TENANCY_ROOTS": json.dumps([str(store)])}).start()
    try:
        yield cluster, store, requests, operator
    finally:
        operator.stop()
        cluster.stop()


@pytest.fixture
def tenants(world) -> tuple[str, str]:
    """Two fresh tenant namespaces, tenant-a (the attacker) and tenant-b (the victim)."""
    suffix = uuid.uuid4().hex[:6]
    return f"tenant-a-{suffix}", f"tenant-b-{suffix}"


def watch(cluster: SimulatedCluster, path: str, seen: list[str]) -> None:
    """Record every request for `path` in `seen` (and let it through)."""

    def record(request: kmock.Request) -> Any:
        seen.append(f"{request.method} {path}")
        return NotImplemented

    cluster.emulator.run(lambda: cluster.server[f"get {path}"] << record)


def job(root: Path, name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A job of `namespace` reading its own data and the shared base model."""
    body = finetunejob(name, namespace, str(root / "models" / "tiny"), str(root),
                       dataset={"uri": str(root / "datasets" / namespace / "train.csv")})
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return body


def adapter(store: Path, name: str, namespace: str, uri: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tessera.dev/v1alpha1", "kind": "Adapter", "metadata": {"name": name, "namespace": namespace},
            "spec": {"baseModel": {"uri": str(store / "models" / "tiny")}, "uri": uri, **spec}}


def status(cluster: SimulatedCluster, kind: tuple[str, str], namespace: str, name: str) -> dict[str, Any]:
    return (cluster.get(*kind, namespace, name) or {}).get("status") or {}


def failed(cluster, kind, namespace, name):
    return lambda: status(cluster, kind, namespace, name).get("phase") == "Failed"


def warnings(cluster: SimulatedCluster, namespace: str, name: str) -> dict[str, str]:
    return {e["reason"]: e["message"] for e in cluster.events(namespace, name) if e["type"] == "Warning"}


def test_a_job_naming_another_tenants_data_model_or_store_is_refused(world, tenants):
    cluster, store, _, operator = world
    a, b = tenants
    theirs = store / "datasets" / b
    attempts = {
        "reader": ({"dataset": {"uri": str(theirs / "private.csv")}}, "spec.dataset.uri"),
        "eval-reader": ({"dataset": {"evalUri": str(theirs / "private.csv")}}, "spec.dataset.evalUri"),
        "model-thief": ({"baseModel": {"uri": str(store / "adapters" / b / "secret-adapter" / "v1")}},
                        "spec.baseModel.uri"),
        "root-mover": ({"store": {"uri": str(theirs)}}, "spec.store.uri"),
        "climber": ({"dataset": {"uri": f"{store}/datasets/{a}/../{b}/private.csv"}}, "spec.dataset.uri"),
        "encoded": ({"dataset": {"uri": f"file://{store}/datasets/{a}/%2e%2e/{b}/private.csv"}},
                    "spec.dataset.uri"),
        "token": ({"dataset": {"uri": "/var/run/secrets/kubernetes.io/serviceaccount/token"}}, "spec.dataset.uri"),
    }
    for name, (spec, _) in attempts.items():
        cluster.create(job(store, name, a, **spec))
    for name, (_, field) in attempts.items():
        cluster.wait_for(f"{name} to be refused", failed(cluster, FTJ, a, name), 60, operator)
        error = status(cluster, FTJ, a, name)["error"]
        assert error["code"] == "OutsideTenantPrefixes", (name, error)
        assert error["message"].startswith(field) and f"namespace {a}'s store prefixes" in error["message"] or \
            "not a store root" in error["message"], (name, error)
        assert warnings(cluster, a, name)["OutsideTenantPrefixes"] == error["message"]
        # Refused before anything was made: no ConfigMap, no Workflow, so no step ever read the data.
        assert cluster.get(*WORKFLOW, a, f"ftj-{name}") is None and cluster.get(*CONFIGMAP, a, f"ftj-{name}") is None
    # The same job reading its own data and the shared base model is submitted.
    cluster.create(job(store, "own-data", a))
    cluster.wait_for("own-data to be submitted", lambda: status(cluster, FTJ, a, "own-data").get("workflowRef"), 60,
                     operator)


def test_a_forged_configmap_never_decides_which_job_or_namespace_the_operator_acts_for(world, tenants):
    cluster, store, requests, operator = world
    a, b = tenants
    # tenant-b's served adapter, which the attack aims to repoint, and its store Secret.
    victim = adapter(store, "victim", b, str(store / "adapters" / b / "victim" / "v1"),
                     serving={"createInferenceService": False}, credentialsSecret="tessera-store",
                     lineage={"job": f"{b}/victim"})
    cluster.create(victim)
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tessera-store", "namespace": b},
                    "data": {}})
    # 1. A job with a refused spec (to learn its uid), a ConfigMap under its name owned by that uid that
    #    says it is tenant-b's `victim`, then the spec fixed.
    cluster.create(job(store, "evil", a, dataset={"uri": str(store / "datasets" / b / "x.csv")}))
    cluster.wait_for("evil to be refused", failed(cluster, FTJ, a, "evil"), 60, operator)
    uid = cluster.job(a, "evil")["metadata"]["uid"]
    forged = job(store, "victim", b, store={"credentialsSecret": "tessera-store"})
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "ftj-evil", "namespace": a, "ownerReferences": [
                        {"apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob", "name": "evil", "uid": uid,
                         "controller": True}]},
                    "data": {"job.yaml": yaml.safe_dump(forged)}})
    watch(cluster, f"/api/v1/namespaces/{b}/secrets/tessera-store", requests)
    fixed = {"spec": {"dataset": {"uri": str(store / "datasets" / a / "train.csv")}}}
    cluster.emulator.call(cluster.server.patch(cluster.kind(*FTJ), a, "evil", fixed))
    cluster.wait_for("evil to be refused again",
                     lambda: status(cluster, FTJ, a, "evil")["error"]["code"] == "FrozenSpecMismatch", 60, operator)
    assert "FrozenSpecMismatch" in warnings(cluster, a, "evil")
    assert cluster.get(*WORKFLOW, a, "ftj-evil") is None

    # 2. A job submitted as it should be; then its ConfigMap deleted and made again (immutable, even)
    #    saying it is tenant-b's job.
    cluster.create(job(store, "honest", a))
    cluster.wait_for("honest to be submitted", lambda: status(cluster, FTJ, a, "honest").get("workflowRef"), 60,
                     operator)
    frozen = cluster.get(*CONFIGMAP, a, "ftj-honest")
    assert frozen["immutable"] is True
    assert status(cluster, FTJ, a, "honest")["specDigest"] == hashlib.sha256(
        frozen["data"]["job.yaml"].encode()).hexdigest()
    cluster.emulator.call(cluster.server.delete(cluster.kind(*CONFIGMAP), a, "ftj-honest"))
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
                    "metadata": {"name": "ftj-honest", "namespace": a, "ownerReferences": frozen["metadata"][
                        "ownerReferences"]}, "data": {"job.yaml": yaml.safe_dump(forged)}})
    cluster.wait_for("honest to stop trusting its ConfigMap", failed(cluster, FTJ, a, "honest"), 60, operator)
    assert status(cluster, FTJ, a, "honest")["error"]["code"] == "FrozenSpecTampered"
    assert "FrozenSpecTampered" in warnings(cluster, a, "honest")

    # Nothing of tenant-b's was read into tenant-a's jobs or changed: its Secret never fetched, its Adapter
    # as it was, no metrics or checkpoints copied.
    assert requests == []
    assert cluster.get(*ADAPTER, b, "victim")["spec"]["uri"] == victim["spec"]["uri"]
    assert not warnings(cluster, b, "victim")
    for name in ("evil", "honest"):
        assert not status(cluster, FTJ, a, name).get("metrics") and not status(cluster, FTJ, a, name).get(
            "checkpoints")


def test_an_adapter_naming_another_tenants_artifact_is_refused_and_never_served(world, tenants):
    cluster, store, _, operator = world
    a, b = tenants
    attempts = {
        "stolen": adapter(store, "stolen", a, str(store / "adapters" / b / "secret-adapter" / "v1")),
        "stolen-base": {**adapter(store, "stolen-base", a, str(store / "adapters" / a / "mine" / "v1")),
                        "spec": {"baseModel": {"uri": str(store / "jobs" / b / "train" / "base")},
                                 "uri": str(store / "adapters" / a / "mine" / "v1")}},
    }
    for body in attempts.values():
        cluster.create(body)
    for name in attempts:
        cluster.wait_for(f"{name} to be refused", failed(cluster, ADAPTER, a, name), 60, operator)
        state = status(cluster, ADAPTER, a, name)
        assert state["reason"] == "OutsideTenantPrefixes" and f"namespace {a}'s store prefixes" in state["message"]
        assert warnings(cluster, a, name)["OutsideTenantPrefixes"] == state["message"]
        assert not state.get("replicas")
    assert cluster.list(*ISVC, a) == []  # nothing was created to serve them


def test_scheduling_comes_only_from_the_installations_allowlist(world, tenants):
    cluster, store, _, operator = world
    a, _ = tenants
    attempts = {
        "tolerate-all": ({"tolerations": [{"operator": "Exists"}]}, "spec.scheduling.tolerations[0]"),
        "control-plane": ({"nodeSelector": {"kubernetes.io/hostname": "control-plane-0"}},
                          "spec.scheduling.nodeSelector"),
        "critical": ({"priorityClassName": "system-node-critical"}, "spec.scheduling.priorityClassName"),
    }
    for name, (scheduling, _) in attempts.items():
        cluster.create(job(store, name, a, scheduling=scheduling))
    for name, (_, field) in attempts.items():
        cluster.wait_for(f"{name} to be refused", failed(cluster, FTJ, a, name), 60, operator)
        error = status(cluster, FTJ, a, name)["error"]
        assert error["code"] == "SchedulingNotAllowed" and error["message"].startswith(field)
        assert "not allowed by this installation (allowed: none)" in error["message"]
        assert "SchedulingNotAllowed" in warnings(cluster, a, name)
        assert cluster.get(*WORKFLOW, a, f"ftj-{name}") is None


def test_an_adapter_gets_only_the_managed_inference_service_and_a_namespace_only_a_few(world, tenants):
    cluster, store, _, operator = world
    a, _ = tenants
    own = str(store / "adapters" / a / "mine" / "v1")
    cluster.create(adapter(store, "named-isvc", a, own, serving={"inferenceService": "gpu-hog-0"}))
    for scheme, uri in (("https", "https://example.com/model"), ("pvc", "pvc://someone-elses-claim/model"),
                        ("gs", "gs://bucket/model")):
        cluster.create({**adapter(store, f"from-{scheme}", a, own),
                        "spec": {"baseModel": {"uri": uri}, "uri": own}})
    cluster.wait_for("named-isvc to be refused", failed(cluster, ADAPTER, a, "named-isvc"), 60, operator)
    assert status(cluster, ADAPTER, a, "named-isvc")["reason"] == "InferenceServiceNotAllowed"
    assert "InferenceServiceNotAllowed" in warnings(cluster, a, "named-isvc")
    for scheme in ("https", "pvc", "gs"):
        cluster.wait_for(f"from-{scheme} to be refused", failed(cluster, ADAPTER, a, f"from-{scheme}"), 60, operator)
        state = status(cluster, ADAPTER, a, f"from-{scheme}")
        assert state["reason"] == "InvalidSpec" and "unsupported store URI scheme" in state["message"]
    assert cluster.list(*ISVC, a) == []

    # Three base models in the shared prefix: the first two get their InferenceService, the third is
    # refused by the per-namespace limit (2 here), with the reason.
    for i in range(3):
        body = adapter(store, f"base-{i}", a, own)
        body["spec"]["baseModel"]["uri"] = str(store / "models" / f"base-{i}")
        cluster.create(body)
        if i < 2:
            cluster.wait_for(f"InferenceService {i}", lambda i=i: cluster.get(*ISVC, a, f"tessera-base-{i}"), 60,
                             operator)
    cluster.wait_for("base-2 to be refused", failed(cluster, ADAPTER, a, "base-2"), 60, operator)
    assert status(cluster, ADAPTER, a, "base-2")["reason"] == "InferenceServiceQuota"
    assert "InferenceServiceQuota" in warnings(cluster, a, "base-2")
    assert sorted(i["metadata"]["name"] for i in cluster.list(*ISVC, a)) == ["tessera-base-0", "tessera-base-1"]


def test_deleting_a_job_removes_its_prefix_and_keeps_its_published_adapter(world, tenants):
    cluster, store, _, operator = world
    a, _ = tenants
    cluster.create(job(store, "done", a))
    cluster.wait_for("done to be submitted", lambda: status(cluster, FTJ, a, "done").get("workflowRef"), 60, operator)
    # What its steps would have written: a checkpoint, and the published adapter; and another job's files.
    checkpoint = store / "jobs" / a / "done" / "checkpoints" / "step-1" / "state.json"
    published = store / "adapters" / a / "done" / "v1" / "adapter_config.json"
    neighbour = store / "jobs" / a / "done-2" / "logs" / "progress.json"
    for path in (checkpoint, published, neighbour):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert cluster.job(a, "done")["metadata"].get("finalizers")  # kopf's, for the deletion handler
    cluster.emulator.call(cluster.server.delete(cluster.kind(*FTJ), a, "done"))
    cluster.wait_for("the job to be gone", lambda: cluster.job(a, "done") is None, 60, operator)
    assert not (store / "jobs" / a / "done").exists()
    assert published.exists() and neighbour.exists()


def test_one_tenant_flooding_the_operator_holds_at_most_its_share_and_another_is_served(world, tenants):
    """Six adapters whose replica never answers a load, against 4 workers and a cap of 2 operations per
    namespace (SETTINGS): the flooding namespace never has more than 2 loads open, each given up after
    the load timeout, and the other namespace's job is handled meanwhile."""
    cluster, store, _, operator = world
    a, b = tenants
    replica = HangingReplica()
    try:
        serve_on_hanging_replica(cluster, a, replica)
        for body in flooding_adapters(store, a, 6):
            cluster.create(body)
        cluster.wait_for("the flood to reach the replica", lambda: replica.open_loads >= 2, 60, operator)
        cluster.create(job(store, "meanwhile", b, dataset={"uri": str(store / "datasets" / a / "x.csv")}))
        cluster.wait_for("the other namespace's job to be handled", failed(cluster, FTJ, b, "meanwhile"), 60,
                         operator)
        cluster.wait_for("loads to be given up and retried", lambda: replica.loads > 2, 60, operator)
        assert replica.peak_open_loads <= int(SETTINGS["TESSERA_MAX_NAMESPACE_OPERATIONS"])
        states = [status(cluster, ADAPTER, a, f"flood-{i}") for i in range(6)]
        assert any("ReadTimeout" in (r.get("message") or "") for s in states for r in s.get("replicas") or []), states
    finally:
        replica.stop()
