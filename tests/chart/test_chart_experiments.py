"""The chart's part in Experiments, rendered by the real helm: the operator's rights on Experiments and
their cell jobs, the cell cap passed to it, and Katib's rights behind `katib.enabled` only."""

from __future__ import annotations

from tests.chart.helm import of_kind, render
from tests.chart.test_chart_render import (
    NAMESPACE,
    env_of,
    grants,
    operator_account,
    operator_container,
    roles_bound_to,
)

KATIB_OPERATOR_GRANTS = {("kubeflow.org", "experiments"): {"get", "create"}, ("kubeflow.org", "trials"): {"list"}}


def operator_cluster_grants(docs: list[dict]) -> dict:
    (cluster,) = [r for r in roles_bound_to(docs, account=operator_account(docs), namespace=NAMESPACE)
                  if r["kind"] == "ClusterRole"]
    return grants(cluster)


def test_the_operator_may_run_experiments_and_gets_the_cell_cap() -> None:
    docs = render({"experiments.maxCells": 12})
    found = operator_cluster_grants(docs)
    assert found[("tessera.dev", "experiments")] == {"list", "watch", "patch"}
    assert found[("tessera.dev", "experiments/status")] == {"patch"}
    assert {"get", "create"} <= found[("tessera.dev", "finetunejobs")]
    assert not set(KATIB_OPERATOR_GRANTS) & set(found)  # no Katib rights unless it is enabled
    assert not [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-katib-trials")]
    assert env_of(operator_container(docs))["TESSERA_EXPERIMENT_MAX_CELLS"] == "12"


def test_katib_enabled_grants_the_search_and_katibs_controller_the_trial_kind() -> None:
    docs = render({"katib.enabled": True})
    found = operator_cluster_grants(docs)
    assert {k: found[k] for k in KATIB_OPERATOR_GRANTS} == KATIB_OPERATOR_GRANTS
    trials = roles_bound_to(docs, account="katib-controller", namespace="kubeflow")
    assert [grants(r) for r in trials] == [{("tessera.dev", "finetunejobs"): {"get", "list", "watch", "create",
                                                                               "delete"}}]
