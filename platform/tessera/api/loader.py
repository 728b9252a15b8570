"""Reading FineTuneJob/Adapter YAML with `--set` overrides, and turning pydantic's errors into
`spec.lora.rank: must be between 1 and 256` lines a person can act on."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tessera.api.adapter import Adapter
from tessera.api.base import PATTERN_WORDS
from tessera.api.experiment import Experiment, set_path, trial_overrides
from tessera.api.finetunejob import FineTuneJob
from tessera.errors import InvalidSpecError
from tessera.safe_yaml import YamlLimitError, safe_load, safe_load_all

Resource = FineTuneJob | Adapter | Experiment
KINDS: dict[str, type[BaseModel]] = {"FineTuneJob": FineTuneJob, "Adapter": Adapter, "Experiment": Experiment}


def load_resources(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Resource]:
    """Every document of a YAML file (or YAML text), validated; all problems reported at once."""
    text, name = _read(source)
    try:
        documents = [d for d in safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise InvalidSpecError([f"not valid YAML: {_yaml_problem(error)}"], name) from None
    if not documents:
        raise InvalidSpecError(["the file holds no document"], name)
    resources: list[Resource] = []
    problems: list[str] = []
    for index, document in enumerate(documents):
        prefix = f"document {index + 1}: " if len(documents) > 1 else ""
        try:
            resources.append(parse_resource(apply_overrides(document, overrides)))
        except InvalidSpecError as error:
            problems.extend(prefix + p for p in error.problems)
    if problems:
        raise InvalidSpecError(problems, name)
    return resources


def load_resource(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Resource:
    resources = load_resources(source, overrides)
    if len(resources) != 1:
        raise InvalidSpecError([f"expected one document, found {len(resources)}"], _read(source)[1])
    return resources[0]


def load_job(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FineTuneJob:
    resource = load_resource(source, overrides)
    if not isinstance(resource, FineTuneJob):
        raise InvalidSpecError([f"kind: expected FineTuneJob, found {resource.kind}"], _read(source)[1])
    return resource


def load_experiment(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    resource = load_resource(source, overrides)
    if not isinstance(resource, Experiment):
        raise InvalidSpecError([f"kind: expected Experiment, found {resource.kind}"], _read(source)[1])
    return resource


def parse_resource(document: Any) -> Resource:
    """A dict (as kubectl or kopf hands it over) validated into its model."""
    if not isinstance(document, dict):
        raise InvalidSpecError(["the document must be a mapping with apiVersion, kind, metadata and spec"])
    kind = document.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidSpecError([f"kind: must be one of {', '.join(KINDS)} (found {kind!r})"])
    body = {k: v for k, v in document.items() if k != "status" or v}
    if model is FineTuneJob:
        body = _with_trial_parameters(body)
    try:
        return model.model_validate(body)  # type: ignore[return-value]
    except ValidationError as error:
        raise InvalidSpecError(describe_errors(model, error)) from None


def _with_trial_parameters(body: dict[str, Any]) -> dict[str, Any]:
    """A Katib trial's FineTuneJob with its parameters set on the spec (`tessera.api.experiment.trial_overrides`)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        overrides = trial_overrides(annotations) if isinstance(annotations, dict) else {}
    except ValueError as error:
        raise InvalidSpecError([f"metadata.annotations.{error}"]) from None
    if not overrides or not isinstance(body.get("spec"), dict):
        return body
    spec = copy.deepcopy(body["spec"])
    for path, value in overrides.items():
        set_path(spec, path, value)
    return {**body, "spec": spec}


def apply_overrides(document: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`helm --set`-style `a.b.c=value` overrides; values are read as YAML scalars or flow lists."""
    if not overrides:
        return document
    if not isinstance(document, dict):
        raise InvalidSpecError(["--set needs a mapping document"])
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            raise InvalidSpecError([f"--set {override!r}: expected path=value"])
        try:
            value = safe_load(raw) if raw else ""
        except YamlLimitError as error:
            raise InvalidSpecError([f"--set {path}: {error}"]) from None
        except yaml.YAMLError:
            value = raw
        node = document
        keys = path.split(".")
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise InvalidSpecError([f"--set {path}: {key} is not a mapping"])
            node = child
        node[keys[-1]] = value
    return document


def describe_errors(model: type[BaseModel], error: ValidationError) -> list[str]:
    return [_describe(model, e) for e in error.errors(include_url=False)]


def _describe(model: type[BaseModel], err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "(document)"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "value_error":
        # Cross-field rules raise "field: rule" relative to the model that owns them.
        message = str(ctx.get("error", err["msg"]))
        if ": " in message.split(" ", 1)[0] + " ":
            field, _, rule = message.partition(": ")
            return f"{'.'.join([*loc, field])}: {rule}"
        return f"{path}: {message}"
    schema = _schema_at(model, loc)
    rule = _RULES.get(kind)
    text = rule(schema, ctx) if rule else err["msg"]
    return f"{path}: {text}"


def _bounds(schema: dict[str, Any], ctx: dict[str, Any]) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        open_low, open_high = schema.get("exclusiveMinimum", False), schema.get("exclusiveMaximum", False)
        if not (open_low or open_high):
            return f"must be between {low} and {high}"
        left = f"greater than {low}" if open_low else f"at least {low}"
        right = f"less than {high}" if open_high else f"at most {high}"
        return f"must be {left} and {right}"
    if "ge" in ctx:
        return f"must be at least {ctx['ge']}"
    if "gt" in ctx:
        return f"must be greater than {ctx['gt']}"
    if "le" in ctx:
        return f"must be at most {ctx['le']}"
    return f"must be less than {ctx.get('lt')}"


def _pattern(schema: dict[str, Any], ctx: dict[str, Any]) -> str:
    pattern = ctx.get("pattern", schema.get("pattern", ""))
    return PATTERN_WORDS.get(pattern, f"must match the pattern {pattern}")


_RULES = {
    "missing": lambda s, c: "required field is missing",
    "extra_forbidden": lambda s, c: "unknown field",
    "literal_error": lambda s, c: f"must be one of: {c.get('expected', '')}",
    "enum": lambda s, c: f"must be one of: {c.get('expected', '')}",
    "greater_than_equal": _bounds,
    "greater_than": _bounds,
    "less_than_equal": _bounds,
    "less_than": _bounds,
    "string_pattern_mismatch": _pattern,
    "string_too_short": lambda s, c: "must not be empty" if c.get("min_length") == 1 else
    f"must be at least {c.get('min_length')} characters",
    "string_too_long": lambda s, c: f"must be at most {c.get('max_length')} characters",
    "too_short": lambda s, c: f"must have at least {c.get('min_length')} item(s)",
    "int_parsing": lambda s, c: "must be an integer",
    "int_type": lambda s, c: "must be an integer",
    "int_from_float": lambda s, c: "must be an integer",
    "float_parsing": lambda s, c: "must be a number",
    "float_type": lambda s, c: "must be a number",
    "bool_parsing": lambda s, c: "must be true or false",
    "bool_type": lambda s, c: "must be true or false",
    "string_type": lambda s, c: "must be a string",
    "dict_type": lambda s, c: "must be a mapping",
    "model_type": lambda s, c: "must be a mapping",
    "model_attributes_type": lambda s, c: "must be a mapping",
    "list_type": lambda s, c: "must be a list",
}


@cache
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    from tessera.api.crd import structural_schema

    return structural_schema(model)


def _schema_at(model: type[BaseModel], loc: list[str]) -> dict[str, Any]:
    node = _model_schema(model)
    for part in loc:
        if "properties" in node and part in node["properties"]:
            node = node["properties"][part]
        elif "items" in node and part.isdigit():
            node = node["items"]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return {}
    return node


def _read(source: str | Path) -> tuple[str, str]:
    if isinstance(source, Path) or ("\n" not in source and source.endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        try:
            return path.read_text(), str(path)
        except FileNotFoundError:
            raise InvalidSpecError(["file not found"], str(path)) from None
        except OSError as error:
            raise InvalidSpecError([f"cannot read: {error.strerror}"], str(path)) from None
    return source, ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
