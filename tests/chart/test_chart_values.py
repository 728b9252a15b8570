"""values.schema.json refuses bad values at install time, and Helm 4 renders what Helm 3 renders.

Helm 3 and Helm 4 word schema errors differently (`operator.replicas: Must be greater than or
equal to 0` against `at '/operator/replicas': minimum: got -1, want 0`); both must name the field.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.helm import documents, helm_path, lint, render, template
from tests.chart.test_chart_render import COMBINATIONS

HELMS = [pytest.param("helm", id="helm3"), pytest.param("helm4", id="helm4")]

BAD_VALUES: dict[str, tuple[dict[str, Any], str, str]] = {
    # case: (values, the field the error names, a word of the rule it breaks)
    "negative-replicas": ({"operator.replicas": -1}, "operator/replicas", "0"),
    "two-replicas": ({"operator.replicas": 2}, "operator/replicas", "1"),
    "unknown-gpu-resource": ({"gpu.resourceName": "nvidia.com/gpus"}, "gpu/resourceName", "nvidia.com/gpu"),
    "empty-store-secret": ({"store.existingSecret": ""}, "store/existingSecret", "1"),
    "missing-store-secret": ({"store.existingSecret": None}, "store", "existingSecret"),
    "store-secret-not-a-name": ({"store.existingSecret": "My Secret"}, "store/existingSecret", "pattern"),
    "store-not-s3": ({"store.uri": "/var/lib/tessera"}, "store/uri", "pattern"),
    "negative-gpus": ({"serving.tessera.gpus": -1}, "serving/tessera/gpus", "0"),
    "unknown-runtime": ({"serving.runtime": "tgi"}, "serving/runtime", "vllm"),
    "rank-vllm-refuses": ({"serving.maxLoraRank": 48}, "serving/maxLoraRank", "64"),
    "digest-not-sha256": ({"images.trainer.digest": "latest"}, "images/trainer/digest", "pattern"),
    "namespace-not-a-label": ({"watchNamespaces": ["Team_A"]}, "watchNamespaces/0", "pattern"),
    "misspelt-key": ({"operator.replica": 1}, "operator", "replica"),
}


def names_field(message: str, field: str) -> bool:
    """Helm 3 writes the field dotted (`store.existingSecret`), Helm 4 as a JSON pointer."""
    return f"/{field}'" in message or field.replace("/", ".") in message


def skip_without(binary: str) -> None:
    if helm_path(binary) is None:
        pytest.skip(f"{binary} is not in .tools/bin nor on PATH (scripts/fetch-tools.sh installs it)")


@pytest.mark.parametrize("binary", HELMS)
@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_refused_naming_the_field(case: str, binary: str) -> None:
    skip_without(binary)
    values, field, rule = BAD_VALUES[case]
    result = template(values, binary=binary)
    assert result.returncode != 0, f"{case} was accepted"
    message = result.stderr
    assert "values don't meet the specifications of the schema" in message, message
    assert any(names_field(line, field) and rule in line for line in message.splitlines()), message


@pytest.mark.parametrize("combination", ["default", "gpu-node-pool", "private-registry", "namespaced"])
def test_helm4_lints_and_renders_what_helm3_renders(combination: str) -> None:
    skip_without("helm4")
    values = COMBINATIONS[combination]
    result = lint(values, binary="helm4")
    assert result.returncode == 0, result.stdout + result.stderr
    helm4 = template(values, binary="helm4")
    assert helm4.returncode == 0, helm4.stderr

    def key(doc: dict[str, Any]) -> tuple[str, str, str]:
        return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]

    assert sorted(documents(helm4.stdout), key=key) == sorted(render(values), key=key)
