"""CustomResourceDefinitions generated from the pydantic models, so the API server enforces the same
rules (enums, ranges, patterns, required fields) that `tessera validate` and the operator enforce.

Pydantic emits JSON Schema with `$ref`s, `anyOf [X, null]` and titles; a Kubernetes structural
schema wants every node inlined and typed, `nullable` instead of null unions, and no titles.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from tessera.api.adapter import Adapter, AdapterSpec, AdapterStatus
from tessera.api.base import GROUP, VERSION
from tessera.api.experiment import Experiment, ExperimentSpec, ExperimentStatus
from tessera.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

_DROPPED_KEYS = {"title", "$defs"}
_KEPT_KEYS = {
    "type", "properties", "required", "items", "additionalProperties", "enum", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "description", "default", "format",
}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as a Kubernetes structural schema (camelCase property names)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    for union in ("anyOf", "oneOf"):
        if union in node:
            options = [o for o in node[union] if o.get("type") != "null"]
            nullable = len(options) < len(node[union])
            if len(options) != 1:
                raise ValueError(f"unsupported union in schema: {node[union]}")
            rest = {k: v for k, v in node.items() if k != union}
            out = _structural({**options[0], **rest}, defs)
            if nullable:
                out["nullable"] = True
                out.pop("default", None)
            return out

    out: dict[str, Any] = {}
    if "const" in node:
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key in _DROPPED_KEYS or key not in _KEPT_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _structural(value, defs)
        elif key == "default" and (value is None or isinstance(value, dict | list)):
            continue  # object defaults come from the models; null is not a valid default here
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 (what Kubernetes speaks) marks a bound exclusive with a boolean.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    if out.get("type") == "object" and "properties" not in out:
        extra = out.get("additionalProperties")
        if extra is None or extra is True or extra == {}:
            out.pop("additionalProperties", None)
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "object" and out.get("additionalProperties") is False:
        out.pop("additionalProperties")  # structural schemas prune unknown fields instead
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        # An untyped value (`Any`): any YAML, null included (a matrix axis may take null).
        out["x-kubernetes-preserve-unknown-fields"] = True
        out["nullable"] = True
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _object_schema(spec: type[BaseModel], status: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec),
            "status": structural_schema(status),
        },
    }


def _crd(
    kind: str, plural: str, short: str, schema: dict[str, Any], columns: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "tessera"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["tessera"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def custom_resource_definitions() -> list[dict[str, Any]]:
    """The FineTuneJob, Adapter and Experiment CRDs, in that order."""
    job = _crd(
        "FineTuneJob",
        "finetunejobs",
        "ftj",
        _object_schema(FineTuneJobSpec, FineTuneJobStatus, FineTuneJob.__doc__ or ""),
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent"},
            {"name": "Adapter", "type": "string", "jsonPath": ".status.adapterRef.name"},
            _age(),
        ],
    )
    adapter = _crd(
        "Adapter",
        "adapters",
        "lora",
        _object_schema(AdapterSpec, AdapterStatus, Adapter.__doc__ or ""),
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
            _age(),
        ],
    )
    experiment = _crd(
        "Experiment",
        "experiments",
        "ftx",
        _object_schema(ExperimentSpec, ExperimentStatus, Experiment.__doc__ or ""),
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Done", "type": "integer", "jsonPath": ".status.cellsDone"},
            {"name": "Total", "type": "integer", "jsonPath": ".status.cellsTotal"},
            {"name": "Best", "type": "string", "jsonPath": ".status.bestCell"},
            {"name": "Score", "type": "number", "jsonPath": ".status.bestScore"},
            {"name": "Cost", "type": "number", "jsonPath": ".status.costSoFar"},
            _age(),
        ],
    )
    return [job, adapter, experiment]


def crds_yaml() -> str:
    header = "# Generated by `tessera crds` from platform/tessera/api; do not edit by hand.\n"
    return header + yaml.safe_dump_all(custom_resource_definitions(), sort_keys=False)
