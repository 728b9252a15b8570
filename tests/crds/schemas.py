"""Validate a Kubernetes object against the real CRD schema of its kind, as an API server would.

The upstream CRDs vendored beside this file (see README.md) and Tessera's own generated CRDs
(`charts/tessera/crds/*.yaml`, when present) are read once. Each version's `openAPIV3Schema` is
turned into a JSON Schema with the Kubernetes extensions mapped:

- `x-kubernetes-int-or-string` → integer or string;
- `x-kubernetes-preserve-unknown-fields` → the object keeps unknown fields;
- any other object with `properties` rejects unknown fields. A real API server prunes them
  silently (or rejects them under `kubectl --validate=strict`); a builder that writes a field the
  schema does not know has a bug either way, so this check is strict;
- `x-kubernetes-list-type: map` → the `x-kubernetes-list-map-keys` must be unique per item.

What an API server checks and this does not: the CEL rules in `x-kubernetes-validations` (there
is no CEL evaluator here) and the formats `int32`/`int64`/`byte`. `metadata` is checked for the
rules of ObjectMeta that builders can break (a DNS-1123 name or a generateName, string labels and
annotations).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CRD_DIRS = (HERE, REPO_ROOT / "charts" / "tessera" / "crds")

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _unique_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Iterable[Any]:
    if not validator.is_type(instance, "array"):
        return
    seen: set[tuple] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key, strict=True))
            yield jsonschema.ValidationError(f"duplicate entry with {shown} in a list keyed by {keys}")
        seen.add(key)


_KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_map_keys}
)


def to_json_schema(node: Any, strict: bool = True) -> Any:
    """Map one openAPIV3Schema node (recursively) to the JSON Schema an API server applies.

    `strict` refuses unknown fields (kubectl --validate=strict); without it they are let through,
    for callers that prune them first as the API server does.
    """
    if isinstance(node, list):
        return [to_json_schema(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (v if k in ("enum", "required", "default") else to_json_schema(v, strict))
        for k, v in node.items()
        if k not in ("description", "x-kubernetes-validations")
    }
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        # OpenAPI v3.0 marks a bound exclusive with a boolean; JSON Schema draft 7 wants the number.
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            out.pop(exclusive)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if strict and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") != "map":
        out.pop("x-kubernetes-list-map-keys", None)
    for key in ("x-kubernetes-list-type", "x-kubernetes-map-type", "x-kubernetes-embedded-resource"):
        out.pop(key, None)
    return out


@functools.cache
def _file_schemas(path: Path) -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) → JSON Schema, for every served version of every CRD in `path`."""
    schemas: dict[tuple[str, str, str], dict] = {}
    with path.open() as stream:
        for doc in yaml.load_all(stream, Loader=_Loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                raw = version["schema"]["openAPIV3Schema"]
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = to_json_schema(raw)
    return schemas


@functools.cache
def _crd_schemas() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) → JSON Schema, for every CRD in the folders of CRD_DIRS."""
    schemas: dict[tuple[str, str, str], dict] = {}
    for folder in CRD_DIRS:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            schemas |= _file_schemas(path)
    return schemas


@functools.cache
def _validator(group: str, version: str, kind: str, crd_file: Path | None = None) -> Any:
    schemas = _file_schemas(crd_file) if crd_file else _crd_schemas()
    return _KubeValidator(schemas[(group, version, kind)])


def known_kinds() -> set[tuple[str, str, str]]:
    """(group, version, kind) of every CRD this helper can validate against."""
    return set(_crd_schemas())


def _metadata_problems(metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return ["metadata: must be an object"]
    problems = []
    name = metadata.get("name")
    if name is None and not metadata.get("generateName"):
        problems.append("metadata.name: required (or metadata.generateName)")
    if name is not None and (not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        for key, value in (metadata.get(field) or {}).items():
            if not isinstance(value, str):
                problems.append(f"metadata.{field}.{key}: {value!r} must be a string")
            elif field == "labels" and (len(value) > 63 or not LABEL_VALUE.match(value)):
                problems.append(f"metadata.labels.{key}: {value!r} is not a valid label value")
    return problems


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def validate_against_crd(obj: dict, crd_file: Path | None = None) -> list[str]:
    """Every way `obj` breaks its kind's CRD schema, as `path: message` lines (empty = valid).

    `crd_file` picks one CRD file (another release of the kind) instead of the folders above.
    Raises KeyError when no CRD for the object's apiVersion/kind is known: a test that meant to
    validate must not pass by validating nothing.
    """
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    kind = obj.get("kind", "")
    known = _file_schemas(crd_file) if crd_file else _crd_schemas()
    validator = _validator(group, version, kind, crd_file) if (group, version, kind) in known else None
    if validator is None:
        raise KeyError(f"no CRD known for apiVersion={obj.get('apiVersion')!r} kind={kind!r}")
    problems = [f"{_path(e)}: {e.message}" for e in validator.iter_errors(obj)]
    return _metadata_problems(obj.get("metadata")) + sorted(problems)
