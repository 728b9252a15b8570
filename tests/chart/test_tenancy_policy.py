"""The chart's tenancy: the ValidatingAdmissionPolicy that refuses other tenants' store URIs at
`kubectl apply`, its binding, and the settings it hands the operator and the adapter agents.

What stands in for the API server: the rendered documents are checked against the Kubernetes schema
(kubernetes-validate, strict, for the newest version it knows: the policy's v1 API is GA from 1.30),
and the policy's CEL expressions are evaluated with cel-python (Google's CEL, pure Python) on the
objects a tenant would apply. The same cases go through `tessera.api.tenancy` with the settings the
chart gives the operator: the admission policy and the operator must agree.
"""

from __future__ import annotations

from typing import Any

import celpy
import kubernetes_validate
import pytest
from pydantic import ValidationError
from tessera.api import Adapter, FineTuneJob
from tessera.api.tenancy import adapter_problems, job_problems
from tessera_operator.config import OperatorConfig

from tests.chart.helm import of_kind, one, render

VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"
ROOT = "s3://tessera"


def policies(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return render(values, "--api-versions", VAP_API)


def test_the_policy_and_its_binding_render_valid_for_both_kinds():
    docs = policies()
    kinds = of_kind(docs, "ValidatingAdmissionPolicy")
    bindings = of_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert sorted(p["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0] for p in kinds) == [
        "adapters", "finetunejobs"]
    assert {b["spec"]["policyName"] for b in bindings} == {p["metadata"]["name"] for p in kinds}
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings)
    assert all(p["spec"]["failurePolicy"] == "Fail" for p in kinds)
    for doc in kinds + bindings:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def test_no_policy_where_the_cluster_cannot_serve_it_or_tenancy_is_off():
    assert of_kind(render(), "ValidatingAdmissionPolicy") == []  # helm's default capabilities: < 1.30
    assert of_kind(policies({"tenancy.enabled": False}), "ValidatingAdmissionPolicy") == []
    assert of_kind(policies({"tenancy.admissionPolicy.enabled": False}), "ValidatingAdmissionPolicy") == []


def _job(namespace: str, **uris: str) -> dict[str, Any]:
    spec = {"baseModel": {"uri": f"{ROOT}/models/llama"}, "dataset": {"uri": f"{ROOT}/datasets/{namespace}/d.csv",
                                                                       "task": "sentiment"},
            "store": {"uri": ROOT, "credentialsSecret": "tessera-store"}}
    for path, uri in uris.items():
        section, _, field = path.partition(".")
        spec[section] = {**spec[section], field: uri}
    return {"apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": namespace}, "spec": spec}


def _adapter(namespace: str, uri: str, base: str = f"{ROOT}/models/llama") -> dict[str, Any]:
    return {"apiVersion": "tessera.dev/v1alpha1", "kind": "Adapter", "metadata": {"name": "a", "namespace": namespace},
            "spec": {"baseModel": {"uri": base}, "uri": uri, "credentialsSecret": "tessera-store"}}


CASES = [
    ("own data, shared model", _job("tenant-a"), True),
    ("own eval data", _job("tenant-a", **{"dataset.evalUri": f"{ROOT}/datasets/tenant-a/eval.csv"}), True),
    ("another tenant's dataset", _job("tenant-a", **{"dataset.uri": f"{ROOT}/datasets/tenant-b/p.csv"}), False),
    ("another tenant's eval data", _job("tenant-a", **{"dataset.evalUri": f"{ROOT}/jobs/tenant-b/x/eval.csv"}),
     False),
    ("another tenant's adapter as the base", _job("tenant-a", **{"baseModel.uri": f"{ROOT}/adapters/tenant-b/a/v1"}),
     False),
    ("a prefix of a longer namespace", _job("tenant-a", **{"dataset.uri": f"{ROOT}/datasets/tenant-ab/p.csv"}), False),
    ("climbing out", _job("tenant-a", **{"dataset.uri": f"{ROOT}/datasets/tenant-a/../tenant-b/p.csv"}), False),
    ("another bucket", _job("tenant-a", **{"dataset.uri": "s3://elsewhere/datasets/tenant-a/p.csv"}), False),
    ("a store root inside another tenant", _job("tenant-a", **{"store.uri": f"{ROOT}/datasets/tenant-b"}), False),
    ("own adapter", _adapter("tenant-a", f"{ROOT}/adapters/tenant-a/a/v1"), True),
    ("own job's checkpoint", _adapter("tenant-a", f"{ROOT}/jobs/tenant-a/j/checkpoints/step-9/adapter"), True),
    ("another tenant's adapter", _adapter("tenant-a", f"{ROOT}/adapters/tenant-b/secret-adapter/v1"), False),
    ("a base outside the store", _adapter("tenant-a", f"{ROOT}/adapters/tenant-a/a/v1", "s3://other/models/x"),
     False),
]


def _admitted(policy: dict[str, Any], obj: dict[str, Any]) -> tuple[bool, list[str]]:
    """What the API server decides: every validation true, else the messages of the false ones."""
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(obj)}
    messages = []
    for validation in policy["spec"]["validations"]:
        if not env.program(env.compile(validation["expression"])).evaluate(activation):
            messages.append(str(env.program(env.compile(validation["messageExpression"])).evaluate(activation)))
    return not messages, messages


@pytest.mark.parametrize(("case", "obj", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_the_policy_and_the_operator_apply_the_same_rule(case: str, obj: dict[str, Any], allowed: bool) -> None:
    docs = policies()
    plural = "finetunejobs" if obj["kind"] == "FineTuneJob" else "adapters"
    [policy] = [p for p in of_kind(docs, "ValidatingAdmissionPolicy")
                if p["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == [plural]]
    admitted, messages = _admitted(policy, obj)
    assert admitted == allowed, messages
    if not allowed:  # the reason names the field and the rule
        assert messages[0].split(":")[0].startswith("spec.")
        assert "store root" in messages[0] or "must lie under s3://tessera/" in messages[0]

    # The operator, configured from the same rendered Deployment, decides the same.
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    rules = OperatorConfig.from_env(env).tenancy_rules()
    try:
        resource = FineTuneJob.model_validate(obj) if obj["kind"] == "FineTuneJob" else Adapter.model_validate(obj)
    except ValidationError as error:  # the API's own rules refuse it first (`..` in an s3 key)
        problems = [str(error)]
    else:
        problems = job_problems(resource, rules) if obj["kind"] == "FineTuneJob" else adapter_problems(resource, rules)
    assert (not problems) == allowed, problems


def test_the_agent_of_every_predictor_checks_its_own_namespace():
    docs = render()
    for runtime in of_kind(docs, "ClusterServingRuntime"):
        [agent] = [c for c in runtime["spec"]["containers"] if c["name"] == "adapter-agent"]
        assert f"--store-root={ROOT}" in agent["args"] and "--shared-prefix=models" in agent["args"]
        [namespace] = [e for e in agent["env"] if e["name"] == "POD_NAMESPACE"]
        assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_scheduling_allowlist_and_caps_reach_the_operator():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    docs = render({"tenancy.scheduling.tolerations": [toleration],
                   "tenancy.scheduling.priorityClasses": ["training-high"],
                   "tenancy.maxInferenceServicesPerNamespace": 3})
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert config.allowed_tolerations == [toleration] and config.allowed_priority_classes == ["training-high"]
    assert config.max_inference_services == 3 and config.tenancy_rules().roots == (ROOT,)
    assert config.scheduling_allowlist().problems({}, [toleration], "training-high") == []
    assert config.scheduling_allowlist().problems({}, [{"operator": "Exists"}], None)
