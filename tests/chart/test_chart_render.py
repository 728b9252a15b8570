"""charts/tessera rendered by the real helm binary, for the default values and the combinations
users install: a GPU node pool with taints, a private registry, a ServiceMonitor, no
NetworkPolicies, and an operator confined to a few namespaces.

What stands in for a cluster: no Kubernetes API server can run here, so every rendered document
is checked against the schema an API server would apply. Core kinds go through
kubernetes-validate in strict mode (unknown fields are errors) for the oldest Kubernetes the
chart supports and the newest the package knows; custom resources go through
tests/crds/schemas.py against the upstream CRDs (Argo, KServe, Kubeflow) and the chart's own
(Tessera, kopf peering). The ServiceMonitor's CRD is not vendored: its test checks it selects
what it should.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import (
    CHART,
    NAMESPACE,
    REPO,
    documents,
    lint,
    of_kind,
    one,
    render,
    require_helm,
    run_helm,
)
from tests.chart.helm import template as helm_template
from tests.crds.schemas import known_kinds, validate_against_crd

# The chart's floor (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
SCHEMALESS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
DEFAULT_SECRET = "tessera-store"  # noqa: S105 (a Secret's name, not a credential)

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-node-pool": {
        "gpuNodePool.nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "gpuNodePool.tolerations": [GPU_TOLERATION],
        "serving.vllm.gpus": 2,
        "serving.vllm.extraArgs": ["--tensor-parallel-size=2"],
    },
    "cpu-runtime": {"serving.runtime": "tessera", "serving.vllm.enabled": False, "serving.maxLoraRank": 16},
    "private-registry": {
        "global.imageRegistry": "registry.bank.internal/mirror",
        "global.imagePullSecrets": ["bank-registry"],
        "images.server.digest": "sha256:" + "ab" * 32,
    },
    "service-monitor": {
        "serviceMonitor.enabled": True,
        "serviceMonitor.labels": {"release": "kube-prometheus-stack"},
    },
    "no-network-policy": {"networkPolicy.enabled": False},
    "trainer-v2": {"training.launcher": "trainjob"},
    "both-launchers": {"training.otherLaunchers": ["trainjob"]},
    "namespaced": {
        "watchNamespaces": ["research", "trading"],
        "jobNamespaces": ["research"],
        "networkPolicy.apiServer.cidrs": ["10.0.0.1/32"],
        "gpu.resourceName": "amd.com/gpu",
    },
}


def schema_problems(doc: dict[str, Any]) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    if (group, version, doc["kind"]) in known_kinds():
        return validate_against_crd(doc)
    problems = []
    for kubernetes in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.absolute_path) or "<root>"
            problems.append(f"Kubernetes {kubernetes}: {where}: {error.message}")
    return problems


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return deployment(docs)["spec"]["template"]["spec"]["containers"][0]


def runtime(docs: list[dict[str, Any]], name: str = "tessera-vllm") -> dict[str, Any]:
    (found,) = [d for d in of_kind(docs, "ClusterServingRuntime") if d["metadata"]["name"] == name]
    return found


def runtime_container(docs: list[dict[str, Any]], name: str = "tessera-vllm") -> dict[str, Any]:
    return container_named(runtime(docs, name)["spec"]["containers"], "kserve-container")


def container_named(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers if c["name"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


TRAINING_TEMPLATES = ("pytorchjob", "trainingruntime", "trainjob")


def substituted(template: dict[str, Any], name: str = "pytorchjob") -> dict[str, Any]:
    """What the train step's resource template `name` creates, the workflow parameters at their
    defaults, as Argo makes it: the PyTorchJob, the TrainingRuntime or the TrainJob."""
    defaults = {p["name"]: p.get("value", "") for p in template["spec"]["arguments"]["parameters"]}
    defaults |= {"job-name": "fpb-sentiment", "training-job-name": "fpb-sentiment-train"}
    (resource,) = [t["resource"] for t in template["spec"]["templates"] if t["name"] == name]
    text = re.sub(r"\{\{workflow\.parameters\.([a-z-]+)\}\}", lambda m: defaults[m.group(1)], resource["manifest"])
    return yaml.safe_load(text.replace("{{workflow.name}}", "fpb-sentiment-abcde"))


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_helm_lint_strict_passes(combination: str) -> None:
    result = lint(COMBINATIONS[combination])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_rendered_document_validates_against_its_schema(combination: str) -> None:
    docs = render(COMBINATIONS[combination])
    problems = {name_of(doc): schema_problems(doc) for doc in docs
                if (doc["apiVersion"], doc["kind"]) not in SCHEMALESS}
    for template in of_kind(docs, "WorkflowTemplate"):
        for name in TRAINING_TEMPLATES:
            problems[f"{name} of {name_of(template)}"] = validate_against_crd(substituted(template, name))
    assert {name: found for name, found in problems.items() if found} == {}
    kinds = {doc["kind"] for doc in docs}
    assert {"CustomResourceDefinition", "Deployment", "ClusterServingRuntime", "WorkflowTemplate"} <= kinds


def test_crds_ship_with_the_chart() -> None:
    crds = {doc["metadata"]["name"] for doc in of_kind(render(), "CustomResourceDefinition")}
    assert crds == {"finetunejobs.tessera.dev", "adapters.tessera.dev", "experiments.tessera.dev",
                    "clusterkopfpeerings.zalando.org", "kopfpeerings.zalando.org"}


# --- RBAC -----------------------------------------------------------------------------------

OPERATOR_NAMESPACED_GRANTS = {
    ("tessera.dev", "finetunejobs"): {"list", "watch", "patch", "get", "create"},  # create: experiment cells
    ("tessera.dev", "adapters"): {"get", "list", "watch", "create", "patch"},
    ("tessera.dev", "finetunejobs/status"): {"patch"},
    ("tessera.dev", "experiments"): {"list", "watch", "patch"},
    ("tessera.dev", "experiments/status"): {"patch"},
    ("tessera.dev", "adapters/status"): {"patch"},
    ("", "configmaps"): {"get", "create"},
    ("argoproj.io", "workflows"): {"get", "create"},
    ("kubeflow.org", "pytorchjobs"): {"get"},  # the default launcher's kind
    ("serving.kserve.io", "inferenceservices"): {"get", "list", "create"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("zalando.org", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
}
KOPF_CLUSTER_GRANTS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
CLUSTER_PEERING_GRANTS = {
    ("zalando.org", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
}
WORKFLOW_GRANTS = {
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch"},
}
# What each launcher's kind adds: the workflow creates and follows it, the operator reads it.
LAUNCHER_GRANTS = {
    "pytorchjob": ({("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch"}},
                   {("kubeflow.org", "pytorchjobs"): {"get"}}),
    "trainjob": ({("trainer.kubeflow.org", "trainingruntimes"): {"create", "get"},
                  ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch"}},
                 {("trainer.kubeflow.org", "trainjobs"): {"get"}}),
}


def grants(role: dict[str, Any], *, skip_secrets: bool = True) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) → verbs that `role` grants."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                if not (skip_secrets and resource == "secrets"):
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def roles_bound_to(docs: list[dict[str, Any]], account: str, namespace: str) -> list[dict[str, Any]]:
    bindings = [b for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and {"kind": "ServiceAccount", "name": account, "namespace": namespace} in b["subjects"]]
    roles = []
    for binding in bindings:
        ref = binding["roleRef"]
        matches = [r for r in docs if r["kind"] == ref["kind"] and r["metadata"]["name"] == ref["name"]
                   and r["metadata"].get("namespace") == binding["metadata"].get("namespace")]
        assert len(matches) == 1, f"{name_of(binding)} refers to a missing {ref['kind']} {ref['name']}"
        roles.append(matches[0])
    return roles


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_rbac_has_no_wildcard(combination: str) -> None:
    for role in of_kind(render(COMBINATIONS[combination]), "Role") + of_kind(render(COMBINATIONS[combination]),
                                                                             "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(field, [])), f"{name_of(role)}: {field} {rule}"


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_secrets_are_readable_by_name_only(combination: str) -> None:
    docs = render(COMBINATIONS[combination])
    secret_rules = [(role, rule) for role in of_kind(docs, "Role") + of_kind(docs, "ClusterRole")
                    for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secret_rules, "the operator must be able to read the store Secret"
    for role, rule in secret_rules:
        assert role["kind"] == "Role", f"{name_of(role)} grants on Secrets cluster-wide"
        assert rule == {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [DEFAULT_SECRET],
                        "verbs": ["get"]}, name_of(role)
    namespaces = {role["metadata"]["namespace"] for role, _ in secret_rules}
    job_namespaces = {t["metadata"]["namespace"] for t in of_kind(docs, "WorkflowTemplate")}
    assert namespaces == job_namespaces | {NAMESPACE}


def test_operator_watching_all_namespaces_gets_exactly_its_grants_cluster_wide() -> None:
    docs = render()
    roles = roles_bound_to(docs, account=operator_account(docs), namespace=NAMESPACE)
    cluster = [r for r in roles if r["kind"] == "ClusterRole"]
    assert len(cluster) == 1
    assert grants(cluster[0]) == OPERATOR_NAMESPACED_GRANTS | KOPF_CLUSTER_GRANTS | CLUSTER_PEERING_GRANTS


def test_operator_confined_to_namespaces_gets_roles_there_and_only_kopf_reads_cluster_wide() -> None:
    docs = render(COMBINATIONS["namespaced"])
    roles = roles_bound_to(docs, account=operator_account(docs), namespace=NAMESPACE)
    (cluster,) = [r for r in roles if r["kind"] == "ClusterRole"]
    assert grants(cluster) == KOPF_CLUSTER_GRANTS | {("", "namespaces"): {"list", "watch"}}
    by_namespace = {r["metadata"]["namespace"]: grants(r) for r in roles if r["kind"] == "Role" and grants(r)}
    assert by_namespace == {"research": OPERATOR_NAMESPACED_GRANTS, "trading": OPERATOR_NAMESPACED_GRANTS}


def test_operator_module_exists_and_may_watch_and_patch_what_its_handlers_handle() -> None:
    module = next(a for a in operator_container(render())["args"] if a.startswith("--module="))
    module = module.removeprefix("--module=")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not importable here")
    import kopf

    importlib.import_module(module)
    registry = kopf.get_default_registry()
    handled = {(h.selector.group, h.selector.plural or h.selector.any_name)
               for part in (registry._changing, registry._watching, registry._spawning, registry._indexing)
               for h in part.get_all_handlers()}
    assert handled, f"{module} registers no resource handler"
    for resource in handled:
        assert {"list", "watch", "patch"} <= OPERATOR_NAMESPACED_GRANTS.get(resource, set()), resource


@pytest.mark.parametrize("combination", ["default", "namespaced"])
def test_workflow_service_account_may_only_run_the_training_step(combination: str) -> None:
    docs = render(COMBINATIONS[combination])
    for template in of_kind(docs, "WorkflowTemplate"):
        namespace = template["metadata"]["namespace"]
        account = template["spec"]["serviceAccountName"]
        assert any(sa["metadata"] == sa["metadata"] | {"name": account, "namespace": namespace}
                   for sa in of_kind(docs, "ServiceAccount"))
        roles = roles_bound_to(docs, account=account, namespace=namespace)
        assert [grants(r, skip_secrets=False) for r in roles] == [WORKFLOW_GRANTS]


@pytest.mark.parametrize(("combination", "launchers"), [("default", ["pytorchjob"]), ("trainer-v2", ["trainjob"]),
                                                        ("both-launchers", ["pytorchjob", "trainjob"])])
def test_rbac_covers_exactly_the_training_kinds_in_use(combination: str, launchers: list[str]) -> None:
    docs = render(COMBINATIONS[combination])
    base_workflow = {k: v for k, v in WORKFLOW_GRANTS.items() if k[0] != "kubeflow.org"}
    base_operator = {k: v for k, v in OPERATOR_NAMESPACED_GRANTS.items() if k[0] != "kubeflow.org"}
    workflow, operator = dict(base_workflow), dict(base_operator)
    for launcher in launchers:
        workflow |= LAUNCHER_GRANTS[launcher][0]
        operator |= LAUNCHER_GRANTS[launcher][1]
    template = one(docs, "WorkflowTemplate")
    roles = roles_bound_to(docs, account=template["spec"]["serviceAccountName"], namespace=NAMESPACE)
    assert [grants(r, skip_secrets=False) for r in roles] == [workflow]
    (cluster,) = [r for r in roles_bound_to(docs, account=operator_account(docs), namespace=NAMESPACE)
                  if r["kind"] == "ClusterRole"]
    assert grants(cluster) == operator | KOPF_CLUSTER_GRANTS | CLUSTER_PEERING_GRANTS
    # The operator and the WorkflowTemplate default to the first kind; the others are allowed.
    env = env_of(operator_container(docs))
    assert env["TESSERA_LAUNCHER"] == launchers[0]
    assert env["TESSERA_OTHER_LAUNCHERS"] == ",".join(launchers[1:])
    defaults = {p["name"]: p["value"] for p in template["spec"]["arguments"]["parameters"]}
    assert defaults["launcher"] == launchers[0]


def test_a_launcher_the_chart_does_not_know_is_refused() -> None:
    result = lint({"training.launcher": "mpijob"})
    assert result.returncode != 0 and "training.launcher" in result.stdout + result.stderr


def operator_account(docs: list[dict[str, Any]]) -> str:
    return deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]


# --- pod security ---------------------------------------------------------------------------


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """name → (pod-level securityContext, containers) for every pod the chart's objects start."""
    specs = {}
    for doc in of_kind(docs, "Deployment"):
        pod = doc["spec"]["template"]["spec"]
        specs[name_of(doc)] = (pod.get("securityContext", {}), pod["containers"])
    for doc in of_kind(docs, "ClusterServingRuntime"):
        # A ServingRuntime has no pod-level securityContext: its containers carry it all.
        specs[name_of(doc)] = ({}, doc["spec"]["containers"])
    for doc in of_kind(docs, "WorkflowTemplate"):
        steps = [t["container"] for t in doc["spec"]["templates"] if "container" in t]
        specs[name_of(doc)] = (doc["spec"].get("securityContext", {}), steps)
        for role, replica in substituted(doc)["spec"]["pytorchReplicaSpecs"].items():
            pod = replica["template"]["spec"]
            specs[f"{role} of {name_of(doc)}"] = (pod.get("securityContext", {}), pod["containers"])
        runtime = substituted(doc, "trainingruntime")["spec"]["template"]["spec"]["replicatedJobs"][0]
        pod = runtime["template"]["spec"]["template"]["spec"]
        specs[f"TrainingRuntime of {name_of(doc)}"] = (pod.get("securityContext", {}), pod["containers"])
    return specs


@pytest.mark.parametrize("combination", ["default", "gpu-node-pool"])
def test_every_container_runs_non_root_with_a_read_only_root_filesystem(combination: str) -> None:
    specs = pod_specs(render(COMBINATIONS[combination]))
    assert len(specs) >= 5
    for name, (pod, containers) in specs.items():
        assert containers, name
        for container in containers:
            context = pod | container.get("securityContext", {})
            where = f"{name}: container {container.get('name', 'main')}"
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser", 1) != 0, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            assert context.get("privileged") is not True, where


def test_operator_pod_is_hardened_and_probed_on_kopf_health_endpoint() -> None:
    docs = render()
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    assert container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"] and container["resources"]["requests"]
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    match = re.fullmatch(r"--liveness=http://0\.0\.0\.0:(\d+)(/\S+)", liveness)
    assert match, liveness
    port_named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (port_named[get["port"]], get["path"]) == (int(match.group(1)), match.group(2)), probe
    # A read-only root filesystem still needs a writable /tmp for Python.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])


# --- kopf peering: one active operator --------------------------------------------------------


def peering_name(docs: list[dict[str, Any]]) -> str:
    (arg,) = [a for a in operator_container(docs)["args"] if a.startswith("--peering=")]
    return arg.removeprefix("--peering=")


def test_operator_watching_all_namespaces_joins_a_cluster_peering_the_chart_creates() -> None:
    docs = render()
    args = operator_container(docs)["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace=") for a in args)
    (peering,) = of_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == peering_name(docs)
    assert of_kind(docs, "KopfPeering") == []
    spec = deployment(docs)["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod_id = {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert pod_id in operator_container(docs)["env"]


def test_operator_confined_to_namespaces_joins_a_peering_in_each() -> None:
    docs = render(COMBINATIONS["namespaced"])
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=research", "--namespace=trading"]
    assert "--all-namespaces" not in args
    peerings = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in of_kind(docs, "KopfPeering")}
    assert peerings == {("research", peering_name(docs)), ("trading", peering_name(docs))}
    assert of_kind(docs, "ClusterKopfPeering") == []


def test_peering_object_also_in_kopf_dev_group_where_the_cluster_serves_it() -> None:
    """kopf pauses until a peering object exists in every peering group the cluster serves."""
    docs = render({}, "--api-versions", "kopf.dev/v1")
    assert sorted(p["apiVersion"] for p in of_kind(docs, "ClusterKopfPeering")) == ["kopf.dev/v1", "zalando.org/v1"]


# --- serving runtime --------------------------------------------------------------------------


RUNTIMES = {"tessera-vllm": "vllm", "tessera": "tessera"}


def args_of(container: dict[str, Any]) -> dict[str, list[str]]:
    """--option=value arguments → option → values (a flag alone has the value "")."""
    out: dict[str, list[str]] = {}
    for arg in container["args"]:
        if arg.startswith("--"):
            option, _, value = arg.partition("=")
            out.setdefault(option, []).append(value)
    return out


def test_vllm_runtime_flags_derive_from_values() -> None:
    docs = render({"serving.maxLoras": 4, "serving.maxLoraRank": 16, "serving.vllm.maxCpuLoras": 12,
                   "serving.vllm.gpuMemoryUtilization": 0.85, "serving.vllm.maxModelLen": 4096})
    container = runtime_container(docs)
    assert container["command"] == ["vllm", "serve"] and container["args"][0] == "/mnt/models"
    args = args_of(container)
    assert {option: values for option, values in args.items() if option not in ("--host", "--served-model-name")} \
        == {"--port": ["8080"], "--enable-lora": [""], "--max-loras": ["4"], "--max-lora-rank": ["16"],
            "--max-cpu-loras": ["12"], "--gpu-memory-utilization": ["0.85"], "--max-model-len": ["4096"],
            "--middleware": ["tessera_access.middleware.AccessControl", "tessera_access.guard.LoopbackOnlyAdapterApi"]}
    # KServe fills {{.Name}} with the InferenceService's name, as its own vLLM runtime does.
    assert args["--served-model-name"] == ["{{.Name}}"]
    assert env_of(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env_of(container)["HF_HUB_OFFLINE"] == "1"
    assert not re.search(r":(latest)?$", container["image"]) and container["image"].startswith("docker.io/vllm/")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8080}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The runtime holds no store credential: the agent alone fetches.
    assert "envFrom" not in container
    # Fewer CPU-cached adapters than GPU slots is no configuration vLLM accepts: the chart lifts it.
    assert args_of(runtime_container(render({"serving.maxLoras": 16, "serving.vllm.maxCpuLoras": 4})))[
        "--max-cpu-loras"] == ["16"]


def test_runtime_kinds_and_model_formats() -> None:
    docs = render()
    vllm, tessera = runtime(docs, "tessera-vllm")["spec"], runtime(docs, "tessera")["spec"]
    assert {f["name"] for f in vllm["supportedModelFormats"]} == {"tessera", "vLLM"}
    assert {f["name"] for f in tessera["supportedModelFormats"]} == {"tessera", "huggingface"}
    priority = {name: next(f["priority"] for f in runtime(docs, name)["spec"]["supportedModelFormats"]
                           if f["name"] == "tessera") for name in RUNTIMES}
    assert priority["tessera-vllm"] > priority["tessera"]
    server = runtime_container(docs, "tessera")
    assert server["command"] == ["tessera", "serve"]
    # Tessera's server loads adapters only from the volume the agent fills, and holds no credential.
    assert args_of(server)["--allowed-prefix"] == ["/mnt/adapters"] and "envFrom" not in server
    # Its load/unload answer the agent in the pod only (loopback), as vLLM's guard middleware does.
    assert "--adapter-api-loopback-only" in server["args"]
    assert not any("gpu" in key for part in server["resources"].values() for key in part)
    assert "nodeSelector" not in tessera and "tolerations" not in tessera


@pytest.mark.parametrize("name", RUNTIMES)
def test_every_predictor_pod_has_the_adapter_agent_sharing_the_adapters_volume(name: str) -> None:
    docs = render()
    spec = runtime(docs, name)["spec"]
    assert [c["name"] for c in spec["containers"]] == ["kserve-container", "adapter-agent"]
    server, agent = spec["containers"]
    args = args_of(agent)
    assert agent["command"] == ["tessera", "adapter-agent"] and args["--runtime"] == [RUNTIMES[name]]
    assert agent["image"] == operator_container(docs)["image"]
    assert args["--runtime-url"] == [f"http://127.0.0.1:{server['ports'][0]['containerPort']}"]
    assert args["--max-lora-rank"] == args_of(server)["--max-lora-rank"]
    assert args["--allowed-prefix"] == ["s3://tessera"]
    # Both mount the one adapters volume at the path the agent hands the runtime; only the agent writes.
    (adapters_dir,) = args["--adapters-dir"]
    mounts = {c["name"]: {m["mountPath"]: m for m in c["volumeMounts"]}[adapters_dir] for c in (server, agent)}
    assert mounts["kserve-container"]["readOnly"] is True and not mounts["adapter-agent"].get("readOnly")
    assert mounts["kserve-container"]["name"] == mounts["adapter-agent"]["name"]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[mounts["adapter-agent"]["name"]]
    # The operator calls the agent's port; the agent has the store Secret, by name only.
    assert env_of(operator_container(docs))["TESSERA_REPLICA_PORT"] == str(agent["ports"][0]["containerPort"])
    assert agent["envFrom"] == [{"secretRef": {"name": DEFAULT_SECRET}}]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize(("values", "name", "kind"), [({}, "tessera-vllm", "vllm"),
                                                     (COMBINATIONS["cpu-runtime"], "tessera", "tessera")])
def test_serving_runtime_value_picks_the_runtime_the_operator_uses(values: dict[str, Any], name: str,
                                                                    kind: str) -> None:
    docs = render(values)
    env = env_of(operator_container(docs))
    assert (env["TESSERA_SERVING_RUNTIME"], env["TESSERA_SERVING_RUNTIME_KIND"]) == (name, kind)
    assert env["TESSERA_MAX_LORA_RANK"] == str(values.get("serving.maxLoraRank", 64))


def predictor_pod(runtime_spec: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The pod KServe (RawDeployment) makes of a ServingRuntime for an InferenceService: the runtime's
    containers and volumes, the model's args appended to kserve-container's and {{.Name}} filled in,
    the storage initializer as an init container writing /mnt/models, the runtime's labels."""
    model = isvc["spec"]["predictor"]["model"]
    containers = copy.deepcopy(runtime_spec["containers"])
    server = container_named(containers, "kserve-container")
    server["args"] = [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in server["args"]] + model.get("args", [])
    server["volumeMounts"].append({"name": "kserve-provision-location", "mountPath": "/mnt/models", "readOnly": True})
    initializer = {"name": "storage-initializer", "image": "kserve/storage-initializer:v0.15.0",
                   "args": [model["storageUri"], "/mnt/models"],
                   "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}]}
    spec = {key: copy.deepcopy(runtime_spec[key]) for key in ("nodeSelector", "tolerations", "imagePullSecrets")
            if key in runtime_spec}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{isvc['metadata']['name']}-predictor-abc", "labels": runtime_spec["labels"]},
            "spec": {**spec, "initContainers": [initializer], "containers": containers,
                     "volumes": [*runtime_spec["volumes"], {"name": "kserve-provision-location", "emptyDir": {}}]}}


@pytest.mark.parametrize("combination", ["default", "gpu-node-pool", "cpu-runtime", "private-registry"])
def test_predictor_pod_of_the_operators_inference_service_is_a_valid_pod(combination: str) -> None:
    from tessera.api import Adapter
    from tessera_operator.builders import build_inference_service
    from tessera_operator.config import OperatorConfig

    docs = render(COMBINATIONS[combination])
    env = env_of(operator_container(docs))
    config = OperatorConfig.from_env(env)
    document = yaml.safe_load((REPO / "examples" / "adapter.yaml").read_text())
    document["spec"]["baseModel"]["quantizationBits"] = 4
    isvc = build_inference_service(Adapter.model_validate(document), config)
    assert validate_against_crd(isvc) == []
    pod = predictor_pod(runtime(docs, env["TESSERA_SERVING_RUNTIME"])["spec"], isvc)
    assert schema_problems(pod) == []
    server = container_named(pod["spec"]["containers"], "kserve-container")
    if env["TESSERA_SERVING_RUNTIME_KIND"] == "vllm":
        assert server["args"][-1] == "--quantization=bitsandbytes"
        assert f"--served-model-name={isvc['metadata']['name']}" in server["args"]
    # Every mount names a volume of the pod.
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    for container in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, container["name"]


def test_vllm_loads_the_access_middlewares_from_a_configmap_in_every_job_namespace() -> None:
    """vLLM's adapter API shares its inference port, and its OpenAI routes need the same access rules
    as Tessera's server: the chart carries tessera/access itself, unchanged, as the package
    `tessera_access` (access control, and the guard that keeps the adapter API to the pod's agent)."""
    docs = render({"jobNamespaces": ["research", "risk"]})
    package = {path.name: path.read_text() for path in (REPO / "platform" / "tessera" / "access").glob("*.py")}
    assert {"__init__.py", "guard.py", "middleware.py"} <= set(package)
    configmaps = {c["metadata"]["namespace"]: c for c in of_kind(docs, "ConfigMap")
                  if c["metadata"]["name"] == "tessera-vllm-access"}
    assert set(configmaps) == {"research", "risk"}
    assert all(c["data"] == package for c in configmaps.values())
    spec = runtime(docs)["spec"]
    container = runtime_container(docs)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "access"]
    assert mount["mountPath"] == env_of(container)["PYTHONPATH"] + "/tessera_access" and mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "access"]
    assert volume["configMap"] == {"name": "tessera-vllm-access"}
    assert [c for c in of_kind(render({"serving.vllm.enabled": False, "serving.runtime": "tessera"}), "ConfigMap")
            if c["metadata"]["name"] == "tessera-vllm-access"] == []


def test_choosing_a_disabled_runtime_is_refused() -> None:
    result = helm_template({"serving.runtime": "vllm", "serving.vllm.enabled": False})
    assert result.returncode != 0 and "serving.vllm.enabled is false" in result.stderr


def test_gpu_node_pool_places_the_gpu_predictors_on_it() -> None:
    values = COMBINATIONS["gpu-node-pool"]
    docs = render(values)
    spec = runtime(docs)["spec"]
    assert spec["nodeSelector"] == values["gpuNodePool.nodeSelector"]
    assert spec["tolerations"] == [GPU_TOLERATION]
    resources = runtime_container(docs)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
    assert "--tensor-parallel-size=2" in runtime_container(docs)["args"]
    assert "nodeSelector" not in runtime(docs, "tessera")["spec"]
    assert deployment(docs)["spec"]["template"]["spec"].get("tolerations") is None


def test_gpu_resource_name_reaches_runtime_operator_and_workflow() -> None:
    docs = render(COMBINATIONS["namespaced"])
    assert runtime_container(docs)["resources"]["limits"]["amd.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in runtime_container(docs)["resources"]["limits"]
    assert env_of(operator_container(docs))["TESSERA_GPU_RESOURCE"] == "amd.com/gpu"
    template = one(docs, "WorkflowTemplate")
    defaults = {p["name"]: p["value"] for p in template["spec"]["arguments"]["parameters"]}
    assert defaults["gpu-resource"] == "amd.com/gpu"
    limits = substituted(template)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    assert set(limits) == {"amd.com/gpu"}
    assert set(substituted(template, "trainjob")["spec"]["trainer"]["resourcesPerNode"]["limits"]) == {"amd.com/gpu"}


# --- images and registries --------------------------------------------------------------------


def all_images(docs: list[dict[str, Any]]) -> list[str]:
    images = [c["image"] for _, containers in pod_specs(docs).values() for c in containers
              if not c["image"].startswith("{{")]
    images += [p["value"] for t in of_kind(docs, "WorkflowTemplate") for p in t["spec"]["arguments"]["parameters"]
               if p["name"] == "image"]
    images.append(env_of(operator_container(docs))["TESSERA_TRAINER_IMAGE"])
    return images


def test_default_images_are_the_projects_at_the_chart_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = set(all_images(render()))
    vllm = yaml.safe_load((CHART / "values.yaml").read_text())["images"]["vllm"]
    ours = {f"ghcr.io/tessera-ml/tessera-{name}:{app_version}" for name in ("operator", "server", "trainer")}
    assert images == ours | {f"docker.io/vllm/vllm-openai:{vllm['tag']}"}


def test_private_registry_rewrites_every_image_and_hands_out_the_pull_secret() -> None:
    docs = render(COMBINATIONS["private-registry"])
    images = all_images(docs)
    assert images and all(i.startswith(("registry.bank.internal/mirror/tessera-ml/",
                                        "registry.bank.internal/mirror/vllm/")) for i in images), images
    assert runtime_container(docs, "tessera")["image"].endswith("@sha256:" + "ab" * 32)
    pull = [{"name": "bank-registry"}]
    assert deployment(docs)["spec"]["template"]["spec"]["imagePullSecrets"] == pull
    assert all(r["spec"]["imagePullSecrets"] == pull for r in of_kind(docs, "ClusterServingRuntime"))
    template = one(docs, "WorkflowTemplate")
    assert template["spec"]["imagePullSecrets"] == pull
    (account,) = [sa for sa in of_kind(docs, "ServiceAccount")
                  if sa["metadata"]["name"] == template["spec"]["serviceAccountName"]]
    assert account["imagePullSecrets"] == pull


# --- store ----------------------------------------------------------------------------------


def test_store_endpoint_and_secret_reach_the_operator_and_the_predictors() -> None:
    docs = render({"store.endpoint": "minio.storage:9000", "store.useHttps": True, "store.existingSecret": "s3-creds",
                   "store.uri": "s3://bank-ml/tessera"})
    operator = operator_container(docs)
    assert operator["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = env_of(operator)
    assert (env["S3_ENDPOINT"], env["S3_USE_HTTPS"]) == ("minio.storage:9000", "1")
    assert (env["TESSERA_STORE_URI"], env["TESSERA_STORE_SECRET"]) == ("s3://bank-ml/tessera", "s3-creds")
    agents = [container_named(r["spec"]["containers"], "adapter-agent") for r in of_kind(docs, "ClusterServingRuntime")]
    for agent in agents:
        assert env_of(agent)["S3_ENDPOINT"] == "minio.storage:9000"
        assert agent["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert "--allowed-prefix=s3://bank-ml/tessera" in agent["args"]
    template = one(docs, "WorkflowTemplate")
    assert {"name": "store-secret", "value": "s3-creds"} in template["spec"]["arguments"]["parameters"]
    # No credential value is ever rendered: only the Secret's name travels.
    assert not any(e.get("name", "").startswith("AWS_SECRET") for c in (operator, *agents) for e in c["env"])


# --- NetworkPolicies and ServiceMonitor -------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "Exists" for e in expressions), "only Exists is modelled here"
    return selector.get("matchLabels", {}).items() <= labels.items() and all(e["key"] in labels for e in expressions)


def policies_selecting(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p["spec"] for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def ports_of(rule: dict[str, Any]) -> set[int]:
    return {port["port"] for port in rule.get("ports", [])}


def test_network_policies_cover_operator_egress_and_predictor_ingress() -> None:
    docs = render()
    operator_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    predictor_labels = runtime(docs)["spec"]["labels"]
    (operator,) = policies_selecting(docs, operator_labels)
    (predictors,) = policies_selecting(docs, predictor_labels)
    assert operator["policyTypes"] == ["Ingress", "Egress"] and operator["ingress"] == []
    egress_ports = {port for rule in operator["egress"] for port in ports_of(rule)}
    assert egress_ports == {53, 443, 6443, 9000, 8085}  # not the predictors' inference port
    (to_predictors,) = [r for r in operator["egress"] if ports_of(r) == {8085}]
    assert all(selects(peer["podSelector"], predictor_labels) for peer in to_predictors["to"])


def test_only_the_operator_reaches_the_adapter_api_and_callers_only_the_inference_port() -> None:
    """The load/unload API is the agent's port: any other pod of the namespace, or a gateway, reaches
    the runtime's inference port only."""
    docs = render()
    operator_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    (predictors,) = policies_selecting(docs, runtime(docs)["spec"]["labels"])
    assert predictors["policyTypes"] == ["Ingress", "Egress"]
    by_port = {frozenset(ports_of(rule)): rule["from"] for rule in predictors["ingress"]}
    assert set(by_port) == {frozenset({8085}), frozenset({8080})}
    (operator_peer,) = by_port[frozenset({8085})]
    assert selects(operator_peer["podSelector"], operator_labels)
    assert operator_peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert {"podSelector": {}} in by_port[frozenset({8080})]
    # Out of the pod: DNS, the store (storage initializer, agent) and, for auth.mode kubernetes, the API
    # server (TokenReview, SubjectAccessReview); nothing else.
    assert {port for rule in predictors["egress"] for port in ports_of(rule)} == {53, 443, 6443, 9000}
    assert all(rule.get("ports") for rule in predictors["egress"])
    keys_mode = render({"auth.mode": "keys"})
    (predictors,) = policies_selecting(keys_mode, runtime(keys_mode)["spec"]["labels"])
    assert {port for rule in predictors["egress"] for port in ports_of(rule)} == {53, 9000}


def test_job_pods_talk_to_each_other_the_store_and_the_api_server_only() -> None:
    docs = render(COMBINATIONS["namespaced"])
    (jobs,) = [p["spec"] for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-jobs")]
    template = one(docs, "WorkflowTemplate")
    worker_labels = substituted(template)["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "metadata"]["labels"]
    step_labels = template["spec"]["podMetadata"]["labels"]
    expression = jobs["podSelector"]["matchExpressions"][0]
    assert expression == {"key": "tessera.dev/job", "operator": "Exists"}
    assert expression["key"] in worker_labels and expression["key"] in step_labels
    assert jobs["ingress"] == [{"from": [{"podSelector": jobs["podSelector"]}]}]
    open_egress = [rule for rule in jobs["egress"] if not rule.get("ports")]
    assert open_egress == [{"to": [{"podSelector": jobs["podSelector"]}]}]
    assert {port for rule in jobs["egress"] for port in ports_of(rule)} == {53, 443, 6443, 9000}
    (to_api,) = [r for r in jobs["egress"] if 443 in ports_of(r)]
    assert to_api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    namespaces = {p["metadata"]["namespace"] for p in of_kind(docs, "NetworkPolicy") if "jobs" in p["metadata"]["name"]}
    assert namespaces == {"research"}


def test_job_pods_reach_a_teacher_endpoint_only_where_job_egress_allows() -> None:
    """spec.dataset.teacher: the label and evaluate steps call the teacher, which is no peer by default."""
    teacher = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "models"}}}],
               "ports": [{"protocol": "TCP", "port": 80}]}
    docs = render({**COMBINATIONS["namespaced"], "networkPolicy.jobEgress": [teacher]})
    (jobs,) = [p["spec"] for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-jobs")]
    assert jobs["egress"][-1] == teacher
    (default,) = [p["spec"] for p in of_kind(render(COMBINATIONS["namespaced"]), "NetworkPolicy")
                  if p["metadata"]["name"].endswith("-jobs")]
    assert teacher not in default["egress"]


def test_network_policies_can_be_turned_off() -> None:
    assert of_kind(render(COMBINATIONS["no-network-policy"]), "NetworkPolicy") == []


def test_api_server_cidrs_narrow_the_operator_egress() -> None:
    docs = render(COMBINATIONS["namespaced"])
    (operator,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == NAMESPACE]
    (to_api,) = [r for r in operator["spec"]["egress"] if {"protocol": "TCP", "port": 443} in r["ports"]]
    assert to_api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]


def test_service_monitor_scrapes_tessera_predictors_only() -> None:
    docs = render(COMBINATIONS["service-monitor"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    runtime_spec = runtime(docs)["spec"]
    assert monitor["spec"]["selector"]["matchLabels"] == runtime_spec["labels"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["targetPort"] == runtime_spec["containers"][0]["ports"][0]["containerPort"]
    assert endpoint["path"] == runtime_spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert of_kind(render(), "ServiceMonitor") == []


# --- the WorkflowTemplate stays the one pipelines/ renders ------------------------------------


def test_chart_ships_the_rendered_pipeline_file_itself() -> None:
    shipped = CHART / "files" / "workflowtemplate.yaml"
    assert shipped.is_symlink(), "files/workflowtemplate.yaml must link to pipelines/workflowtemplate.yaml"
    assert shipped.resolve() == (REPO / "pipelines" / "workflowtemplate.yaml").resolve()


def test_chart_workflow_template_is_the_pipeline_code_plus_installation_settings() -> None:
    from tessera_pipelines.finetune import build_workflow_template

    rendered = one(render(), "WorkflowTemplate")
    expected = build_workflow_template()
    labels = deployment(render())["metadata"]["labels"]
    expected["metadata"]["namespace"] = NAMESPACE
    expected["metadata"]["labels"] = {k: v for k, v in labels.items() if k != "app.kubernetes.io/component"} | \
        expected["metadata"]["labels"]
    expected["spec"]["serviceAccountName"] = "tessera-pipeline"
    installation = {"image": env_of(operator_container(render()))["TESSERA_TRAINER_IMAGE"],
                    "store-secret": DEFAULT_SECRET, "gpu-resource": "nvidia.com/gpu", "launcher": "pytorchjob"}
    for parameter in expected["spec"]["arguments"]["parameters"]:
        parameter["value"] = installation.get(parameter["name"], parameter["value"])
    assert rendered == expected


def test_packaged_chart_carries_the_workflow_template_and_renders(tmp_path: Path) -> None:
    """`helm package` (what goes to the OCI registry) resolves the link into the archive."""
    helm = require_helm()
    packaged = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert packaged.returncode == 0, packaged.stderr
    (archive,) = tmp_path.glob("tessera-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.getmember("tessera/files/workflowtemplate.yaml")
        assert member.isfile()
        shipped = tar.extractfile(member).read().decode()
    assert shipped == (REPO / "pipelines" / "workflowtemplate.yaml").read_text()
    rendered = run_helm(helm, "template", "tessera", str(archive), "--namespace", NAMESPACE)
    assert rendered.returncode == 0, rendered.stderr
    assert one(documents(rendered.stdout), "WorkflowTemplate") == one(render(), "WorkflowTemplate")


def test_workflow_template_in_every_job_namespace() -> None:
    docs = render({"jobNamespaces": ["research", "risk"]})
    assert sorted(t["metadata"]["namespace"] for t in of_kind(docs, "WorkflowTemplate")) == ["research", "risk"]
    assert {t["metadata"]["name"] for t in of_kind(docs, "WorkflowTemplate")} == {"tessera-finetune"}
