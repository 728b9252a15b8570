"""The chart's inference access: auth.mode on both runtimes, the review rights granted to the
predictors' ServiceAccount only, the quota ConfigMap from values, and the monitoring (PrometheusRule
validated against the upstream CRD, the Grafana dashboard JSON) behind serviceMonitor.enabled."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tessera.access.quota import QuotaPolicy

from tests.chart.helm import helm_path, of_kind, one, render, template
from tests.crds.schemas import validate_against_crd

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = ["research", "wealth"]


def containers(docs: list[dict], runtime: str) -> dict[str, dict]:
    (found,) = [d for d in of_kind(docs, "ClusterServingRuntime") if d["metadata"]["name"] == runtime]
    return {c["name"]: c for c in found["spec"]["containers"]}


def test_kubernetes_mode_by_default_with_review_rights_for_the_predictors_only() -> None:
    docs = render({"jobNamespaces": NAMESPACES})
    tessera = containers(docs, "tessera")["kserve-container"]
    vllm = containers(docs, "tessera-vllm")["kserve-container"]
    assert {"--auth-mode=kubernetes", "--quotas-file=/etc/tessera/quotas/quotas.json"} <= set(tessera["args"])
    assert {e["name"]: e["value"] for e in vllm["env"]}["TESSERA_AUTH_MODE"] == "kubernetes"
    role = one([r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("predictor-access")],
               "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]
    (binding,) = [b for b in of_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tessera-predictor", "namespace": n}
                                   for n in NAMESPACES]
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]) for a in of_kind(docs, "ServiceAccount")}
    assert {(n, "tessera-predictor") for n in NAMESPACES} <= accounts
    # No other binding reaches the review APIs (the operator's and the workflow's roles stay as they were).
    for other in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        if other is not role:
            assert not any({"tokenreviews", "subjectaccessreviews"} & set(r.get("resources", []))
                           for r in other.get("rules", [])), other["metadata"]["name"]
    operator = one(of_kind(docs, "Deployment"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in operator["env"]}["TESSERA_PREDICTOR_SERVICE_ACCOUNT"] == \
        "tessera-predictor"


def test_keys_mode_mounts_the_keys_secret_and_grants_no_review_rights() -> None:
    docs = render({"auth.mode": "keys", "auth.keysSecret": "desk-keys"})
    assert not [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("predictor-access")]
    for runtime in ("tessera", "tessera-vllm"):
        container = containers(docs, runtime)["kserve-container"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
        assert mount == {"name": "api-keys", "mountPath": "/etc/tessera/keys", "readOnly": True}
        (spec,) = [d["spec"] for d in of_kind(docs, "ClusterServingRuntime") if d["metadata"]["name"] == runtime]
        assert {"name": "api-keys", "secret": {"secretName": "desk-keys"}} in spec["volumes"]
    assert "--api-keys=/etc/tessera/keys/keys.json" in containers(docs, "tessera")["kserve-container"]["args"]
    env = {e["name"]: e["value"] for e in containers(docs, "tessera-vllm")["kserve-container"]["env"]}
    assert env["TESSERA_API_KEYS"] == "/etc/tessera/keys/keys.json"


def test_quotas_from_values_are_what_the_middleware_reads() -> None:
    quotas = {"default": {"tokensPerMinute": 50000, "concurrentRequests": 8},
              "subjects": {"system:serviceaccount:batch:loader": {"tokensPerMinute": 20000}},
              "groups": {"trading-desk": {"concurrentRequests": 16}}}
    docs = render({"quotas": quotas, "jobNamespaces": NAMESPACES})
    maps = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tessera-quotas"]
    assert sorted(c["metadata"]["namespace"] for c in maps) == NAMESPACES
    policy = QuotaPolicy.parse(json.loads(maps[0]["data"]["quotas.json"]))
    assert policy.default.tokens_per_minute == 50000 and policy.groups["trading-desk"].concurrent_requests == 16


def test_values_schema_refuses_an_unknown_mode_and_negative_quotas() -> None:
    assert helm_path("helm")
    for values, field in (({"auth.mode": "open"}, "mode"), ({"quotas.default.tokensPerMinute": -5}, "tokensPerMinute")):
        result = template(values)
        assert result.returncode != 0 and field in result.stderr


def test_monitoring_rule_validates_and_dashboard_parses_with_the_metrics_the_code_exports() -> None:
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]
    docs = render({"serviceMonitor.enabled": True, "serviceMonitor.labels": {"release": "prom"}})
    rule = one(of_kind(docs, "PrometheusRule"), "PrometheusRule")
    assert validate_against_crd(rule) == []
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"TesseraInferenceErrorRate", "TesseraInferenceLatencyHigh", "TesseraQuotaRejections",
                           "TesseraAdapterLoadFailures"}
    (dashboard_map,) = [c for c in of_kind(docs, "ConfigMap")
                        if c["metadata"].get("labels", {}).get("grafana_dashboard")]
    dashboard = json.loads(dashboard_map["data"]["tessera-inference.json"])
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + list(alerts.values())
    exported = "".join((REPO / "platform/tessera" / module).read_text()
                       for module in ("access/audit.py", "serve/metrics.py"))
    for name in {m for e in expressions for m in re.findall(r"\b(tessera_[a-z_]+)", e)}:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in exported, f"{name} is not a metric Tessera exports"
