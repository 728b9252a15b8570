"""The FineTuneJob/Adapter API: defaults, validation messages, `--set`, the generated CRDs, and
`tessera validate` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tessera.api import FineTuneJob, load_job, load_resources
from tessera.api.crd import crds_yaml, custom_resource_definitions
from tessera.errors import InvalidSpecError

from tests.crds.schemas import validate_against_crd

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD = REPO / "tests" / "api" / "bad"

MINIMAL = """
apiVersion: tessera.dev/v1alpha1
kind: FineTuneJob
metadata: {name: minimal}
spec:
  baseModel: {uri: .tessera/models/tiny-llama}
  dataset: {uri: data.csv, task: sentiment}
"""

# file -> every problem line `tessera validate` must print for it (substrings).
BAD_EXPECTATIONS = {
    "malformed-yaml.yaml": ["not valid YAML: line 5"],
    "unknown-field.yaml": ["spec.lora.ranks: unknown field"],
    "out-of-range.yaml": [
        "spec.lora.rank: must be between 1 and 256",
        "spec.lora.dropout: must be at least 0.0 and less than 1.0",
        "spec.distribution.zeroStage: must be between 0 and 3",
    ],
    "missing-secret.yaml": ["spec.store.credentialsSecret: required because spec.baseModel.uri is an s3:// URI"],
    "bad-name-and-task.yaml": [
        "metadata.name: must be a DNS-1123 label",
        "spec.baseModel.quantization.bits: must be one of: 4 or 8",
        "spec.dataset.task: must be one of: 'sentiment'",
    ],
    "gguf-quantized.yaml": ["spec.baseModel.quantization.bits: bitsandbytes quantizes a Hugging Face checkpoint"],
    "adapter-missing-fields.yaml": [
        "spec.baseModel: required field is missing",
        "spec.sha256: must be a sha256 digest",
    ],
}

# Bad files whose breakage the API server itself catches with the generated schema (the others
# need a cross-field rule or are not YAML at all, so only `tessera validate` and the operator see them).
SCHEMA_CATCHES = {
    "unknown-field.yaml": "spec.lora",
    "out-of-range.yaml": "spec.lora.rank",
    "bad-name-and-task.yaml": "spec.dataset.task",
    "adapter-missing-fields.yaml": "spec",
}


def test_defaults_follow_the_fingpt_qlora_recipe() -> None:
    job = load_job(MINIMAL)
    quant = job.spec.base_model.quantization
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", True)
    assert (job.spec.lora.rank, job.spec.lora.alpha, job.spec.lora.dropout) == (8, 32, 0.1)
    assert job.spec.training.learning_rate == 1e-4
    assert job.metadata.namespace == "default"
    assert job.adapter_name == "minimal"
    assert job.inference_service_name == "tessera-tiny-llama"


def test_set_overrides_fields_like_helm() -> None:
    job = load_job(
        MINIMAL,
        ["spec.lora.rank=16", "spec.training.packing=false", "spec.lora.targetModules=[q_proj, v_proj]"],
    )
    assert job.spec.lora.rank == 16
    assert job.spec.training.packing is False
    assert job.spec.lora.target_modules == ["q_proj", "v_proj"]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        load_job(MINIMAL, ["spec.lora.rank=0", "spec.training.batchSize=0", "spec.training.epochs=abc"])
    assert caught.value.problems == [
        "spec.lora.rank: must be between 1 and 256",
        "spec.training.epochs: must be a number",
        "spec.training.batchSize: must be between 1 and 1024",
    ]


def test_eval_split_and_eval_uri_exclude_each_other() -> None:
    with pytest.raises(InvalidSpecError, match="spec.dataset.evalSplit: set either evalSplit or evalUri"):
        load_job(MINIMAL, ["spec.dataset.evalUri=eval.csv", "spec.dataset.evalSplit=0.1"])
    assert load_job(MINIMAL, ["spec.dataset.evalUri=eval.csv"]).spec.dataset.eval_uri == "eval.csv"


def test_zero3_cannot_shard_a_quantized_base() -> None:
    with pytest.raises(InvalidSpecError, match="spec.distribution.zeroStage: stage 3 cannot shard"):
        load_job(MINIMAL, ["spec.distribution.zeroStage=3"])
    assert load_job(MINIMAL, ["spec.distribution.zeroStage=3", "spec.baseModel.quantization.bits=null"])


def test_manifest_round_trips_in_camel_case() -> None:
    job = load_job(MINIMAL)
    manifest = job.to_manifest()
    assert manifest["spec"]["baseModel"]["quantization"]["doubleQuant"] is True
    assert FineTuneJob.model_validate(manifest) == job


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    for resource in load_resources(path):
        assert validate_against_crd(resource.to_manifest()) == []
        raw = yaml.safe_load(path.read_text())
        assert validate_against_crd(raw) == [], "the file as kubectl would send it must pass the CRD schema"


@pytest.mark.parametrize("name", sorted(BAD_EXPECTATIONS))
def test_validate_command_lists_every_error(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tessera", "validate", str(BAD / name)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for expected in BAD_EXPECTATIONS[name]:
        assert expected in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("  - ")]) == len(
        BAD_EXPECTATIONS[name]
    )


def test_validate_command_accepts_the_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tessera", "validate", *map(str, EXAMPLES)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("is valid") == len(EXAMPLES)


@pytest.mark.parametrize("name", sorted(SCHEMA_CATCHES))
def test_generated_schema_rejects_bad_objects(name: str) -> None:
    problems = validate_against_crd(yaml.safe_load((BAD / name).read_text()))
    assert any(p.startswith(SCHEMA_CATCHES[name]) for p in problems), problems


def test_crds_validate_in_strict_mode() -> None:
    version = kubernetes_validate.latest_version()
    for crd in custom_resource_definitions():
        kubernetes_validate.validate(crd, version, strict=True)


def _walk(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
        if banned in node:
            problems.append(f"{path}: {banned}")
    for name, child in node.get("properties", {}).items():
        problems += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _walk(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_crd_schemas_are_structural() -> None:
    for crd in custom_resource_definitions():
        version = crd["spec"]["versions"][0]
        assert _walk(version["schema"]["openAPIV3Schema"], crd["spec"]["names"]["kind"]) == []
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]][0] == "Phase"
    names = {c["spec"]["names"]["kind"]: c["spec"]["names"]["shortNames"] for c in custom_resource_definitions()}
    assert names == {"FineTuneJob": ["ftj"], "Adapter": ["lora"], "Experiment": ["ftx"]}


def test_chart_copy_of_the_crds_is_in_sync() -> None:
    chart_copy = REPO / "charts" / "tessera" / "crds" / "tessera.dev_crds.yaml"
    assert chart_copy.read_text() == crds_yaml(), "run `make crds` to regenerate the chart's CRDs"


def _laughs(levels: int, width: int = 9) -> str:
    """A billion-laughs document: `levels` anchors, each aliasing the previous one `width` times."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("bomb", [
    _laughs(9) + MINIMAL + "  lora: {targetModules: *lol8}\n",  # expanded in a field that is read
    _laughs(4, 60) + MINIMAL,  # expanded nowhere, wide instead of deep: refused all the same
    MINIMAL.replace("metadata:", "x: &self [*self]\nmetadata:"),  # an alias inside itself
], ids=["billion-laughs", "wide-laughs", "recursive"])
def test_yaml_bombs_are_refused_by_everything_that_loads_specs(bomb: str, tmp_path: Path) -> None:
    """Billion laughs (and self-referencing aliases) fail in `validate`, `render` and the loader, at
    once and with a clear error; an ordinary anchor/alias still works."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    with pytest.raises(InvalidSpecError, match="aliases|refers to a node"):
        load_resources(path)
    for command in (["validate", str(path)], ["render", "-f", str(path)]):
        result = subprocess.run([sys.executable, "-m", "tessera", *command], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        assert result.returncode == 2, (command, result.stderr[-500:])
        assert "Traceback" not in result.stderr and ("aliases" in result.stderr or "refers to" in result.stderr)
    flow = "{" + ", ".join(line.replace(": ", ": ", 1) for line in _laughs(9).splitlines()) + "}"
    with pytest.raises(InvalidSpecError, match="aliases"):
        load_resources(MINIMAL, [f"spec.lora.targetModules={flow}"])
    anchors = MINIMAL.replace("minimal}", "minimal, labels: &l {team: fx}, annotations: *l}")
    assert load_resources(anchors)[0].metadata.name == "minimal"


@pytest.mark.parametrize(("field", "value", "words"), [
    ("spec.store.uri", "file:///etc", "/etc is a system directory"),
    ("spec.store.uri", "/", "system directory"),
    ("spec.store.uri", "../../../../../../usr/lib", "system directory"),
    ("spec.store.uri", "s3://tessera/../../x", "'..' is not allowed"),
    ("spec.store.uri", "s3://tessera/a/./../../x", "'..' is not allowed"),
    ("spec.store.uri", "s3://AKIAEXAMPLE:wJalrXUtnFEMI@minio:9000/tessera", "invalid bucket name"),
    ("spec.store.uri", "s3://minio-user@tessera/x", "invalid bucket name"),
    ("spec.store.uri", "gs://bucket/x", "unsupported store URI scheme"),
    ("spec.dataset.uri", "/proc/self/environ", "system pseudo-file"),
    ("spec.dataset.uri", "file:///proc/self/%65nviron", "system pseudo-file"),
    ("spec.dataset.evalUri", "s3://tessera/data/../../../secrets.csv", "'..' is not allowed"),
    ("spec.baseModel.uri", "file://host/models/x", "must be local"),
])
def test_store_uris_are_refused_at_validation(field: str, value: str, words: str) -> None:
    """The URI rules hold at admission (`tessera validate`, the operator's submit), with the same parser
    the store uses, and a refusal never repeats credentials found in the URI."""
    overrides = [f"{field}={value}", "spec.store.credentialsSecret=minio"]
    with pytest.raises(InvalidSpecError) as caught:
        load_resources(MINIMAL, overrides)
    message = str(caught.value)
    assert words in message and f"{field.removeprefix('spec.')}".split(".")[-1] in message
    assert "wJalrXUtnFEMI" not in message and "minio-user" not in message
