"""docs/install.md says what works: its values file installs, its FineTuneJob is valid and fits
those values, and every `tessera` command it shows exists.

The guide's blocks are read from the Markdown itself, so editing the guide re-runs these checks.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tests.chart.helm import CHART, NAMESPACE, REPO, documents, require_helm, run_helm
from tests.chart.test_chart_render import SCHEMALESS, name_of, schema_problems
from tests.crds.schemas import validate_against_crd

GUIDE = REPO / "docs" / "install.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(), flags=re.M | re.S)


def values_file() -> dict[str, Any]:
    (text,) = [b for b in blocks("yaml") if b.startswith("# values-private.yaml")]
    return yaml.safe_load(text)


def finetunejob() -> tuple[str, dict[str, Any]]:
    (text,) = [b for b in blocks("yaml") if "kind: FineTuneJob" in b]
    return text, yaml.safe_load(text)


@pytest.fixture(scope="module")
def values_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guide") / "values-private.yaml"
    path.write_text(yaml.safe_dump(values_file()))
    return path


def test_guide_values_lint_and_render_valid_objects(values_path: Path) -> None:
    helm = require_helm()
    linted = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_path))
    assert linted.returncode == 0, linted.stdout + linted.stderr
    rendered = run_helm(helm, "template", "tessera", str(CHART), "-n", NAMESPACE, "-f", str(values_path))
    assert rendered.returncode == 0, rendered.stderr
    docs = documents(rendered.stdout)
    problems = {name_of(d): schema_problems(d) for d in docs if (d["apiVersion"], d["kind"]) not in SCHEMALESS}
    assert {name: found for name, found in problems.items() if found} == {}
    registry = values_file()["global"]["imageRegistry"]
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    images = [c["image"] for pod in pods for c in pod["containers"]]
    assert images and all(image.startswith(registry + "/") for image in images)


def test_guide_finetunejob_is_valid() -> None:
    from tessera.api import load_job

    text, manifest = finetunejob()
    job = load_job(text)
    assert job.metadata.name == "fpb-sentiment"
    assert validate_against_crd(manifest) == []


def test_guide_finetunejob_fits_the_guide_values() -> None:
    _, manifest = finetunejob()
    values = values_file()
    assert manifest["metadata"]["namespace"] in values["jobNamespaces"]
    assert manifest["spec"]["store"]["credentialsSecret"] == values["store"]["existingSecret"]
    assert manifest["spec"]["store"]["uri"] == values["store"]["uri"]
    assert manifest["spec"]["scheduling"]["tolerations"] == values["gpuNodePool"]["tolerations"]
    assert manifest["spec"]["scheduling"]["nodeSelector"] == values["gpuNodePool"]["nodeSelector"]


def test_guide_finetunejob_is_within_its_namespaces_prefixes_and_allowed_placement() -> None:
    """With tenancy on (the chart's default), the guide's job passes the operator's rules."""
    from tessera.api import FineTuneJob
    from tessera_operator.builders import check_tenancy
    from tessera_operator.config import OperatorConfig

    _, manifest = finetunejob()
    scheduling = values_file()["tenancy"]["scheduling"]
    config = OperatorConfig(store_uri=values_file()["store"]["uri"], allowed_tolerations=scheduling["tolerations"],
                            allowed_node_selectors=scheduling["nodeSelectors"])
    check_tenancy(FineTuneJob.model_validate(manifest), config)  # raises PolicyError with the reasons


def tessera_commands() -> list[list[str]]:
    """The `tessera …` command lines of the guide's shell blocks, up to their first option or argument."""
    commands = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["tessera"]:
                commands.append(words)
    return commands


def test_guide_tessera_commands_exist() -> None:
    from tessera.cli import app

    commands = tessera_commands()
    assert {tuple(c[:2]) for c in commands} >= {("tessera", "model"), ("tessera", "store"), ("tessera", "validate")}
    for words in commands:
        path = [w for w in words[1:3] if not w.startswith("-") and "/" not in w and "." not in w]
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"{' '.join(words)}: {result.output}"
        for option in [w.split("=")[0] for w in words if w.startswith("--")]:
            assert option in result.output, f"{' '.join(words)}: no option {option}"
