"""A Kubernetes API server on 127.0.0.1 for tests: kmock's `KubernetesEmulator`, made strict enough
for kopf, the `kubernetes` client and kubectl.

Stands in for: kube-apiserver with its CRD handling and the garbage collector. No real API server
can run on the development and CI machines (no container engine, no control-plane binaries).

kmock (by kopf's author) provides the HTTP server, request parsing, discovery documents, Status
errors and the reaction DSL (tests inject faults with `server[...] << 500`). It stores objects as
plain dicts merged on every PATCH; a real API server does more, and so does this subclass:

- `metadata.uid`, `resourceVersion` (one counter for the whole server), `creationTimestamp`,
  `generation` (bumped when anything but metadata/status changes), `generateName`;
- 201 on create, 409 AlreadyExists on a duplicate name, 409 Conflict on a stale resourceVersion,
  422 Invalid for objects that break their CRD's schema (types, enums, ranges, patterns);
  unknown fields are pruned as a real server prunes them, and recorded in `pruned`;
- the `status` subresource: the main endpoint ignores status, `/status` changes nothing else;
- JSON merge patch (RFC 7386), JSON patch (RFC 6902, with `test`), and strategic merge patch
  treated as a merge patch (exact for the custom resources here; lists are replaced whole);
- PUT (replace) with optimistic concurrency;
- label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and `metadata.name`/`namespace`
  field selectors on lists and watches;
- watches that resume from a resourceVersion (events are kept for the test's lifetime) and end
  after `timeoutSeconds`;
- deletion with finalizers (`deletionTimestamp`, removal when the last finalizer goes) and
  background cascading deletion of dependents through `ownerReferences` (the garbage collector);
- `meta.k8s.io/v1` Table responses built from a CRD's `additionalPrinterColumns`, so
  `kubectl get ftj` shows the columns a real cluster shows.

Namespaces exist as objects (kopf lists them) and are made on first use, as the
NamespaceAutoProvision admission plugin does. Installed CRDs are objects too (kopf watches them).

Not emulated: admission webhooks, CEL validation rules, schema defaulting, RBAC, server-side apply.

Test-side controllers (tests/operator/controllers.py) live on the same event loop and use the
internal methods (`create`, `patch`, `get`, `list`, `delete`, `subscribe`) rather than HTTP.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import json
import math
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import jsonschema
import kmock
import yaml
from kmock._internal import parsing, rendering

from tests.crds.schemas import to_json_schema

Key = tuple[str, str, str]  # (group, version, plural)

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's URL parser, plus the one family it cannot parse: /api/v1/namespaces[/name[/status]]."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4:] == ["status"]):
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) > 3 else None,
                                  "status" if parts[4:] == ["status"] else None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


@dataclass
class Kind:
    """One served resource: what discovery says about it, its schema and its printer columns."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    _validator: Any = field(default=None, repr=False, compare=False)

    @property
    def validator(self) -> Any:
        if self._validator is None and self.schema is not None:
            self._validator = jsonschema.Draft7Validator(to_json_schema(self.schema, strict=False))
        return self._validator

    @property
    def key(self) -> Key:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


NAMESPACES = Kind("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True,
                  short_names=("ns",))
CRDS = Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
            namespaced=False, short_names=("crd", "crds"))
CORE_KINDS = [
    NAMESPACES,
    CRDS,
    Kind("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    Kind("", "v1", "secrets", "Secret"),
    Kind("", "v1", "pods", "Pod", status_subresource=True, short_names=("po",)),
    Kind("", "v1", "services", "Service", status_subresource=True, short_names=("svc",)),
    Kind("", "v1", "events", "Event", short_names=("ev",)),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
]


class ApiError(Exception):
    """A Kubernetes `Status` failure: HTTP code, reason and message."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?(?P<key>[A-Za-z0-9_./-]+)\s*(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<value>.*?))?\s*$"
)


def label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a Kubernetes label selector string."""
    if not text:
        return lambda labels: True
    requirements = []
    for part in re.split(r",(?![^()]*\))", text):
        match = _REQUIREMENT.match(part)
        if not match:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key, op, value, neg = match["key"], (match["op"] or "").strip(), match["value"], match["neg"]
        values = {v.strip() for v in value.strip("() ").split(",")} if op in ("in", "notin") else {value}
        requirements.append((key, op, values, bool(neg)))

    def check(labels: dict[str, str]) -> bool:
        for key, op, values, neg in requirements:
            present = key in labels
            if not op:
                ok = not present if neg else present
            elif op in ("=", "=="):
                ok = present and labels[key] in values
            elif op == "!=":
                ok = not present or labels[key] not in values
            elif op == "in":
                ok = present and labels[key] in values
            else:
                ok = not present or labels[key] not in values
            if not ok:
                return False
        return True

    return check


def field_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    if not text:
        return lambda obj: True
    pairs = []
    for part in text.split(","):
        key, op, value = re.split(r"(==|!=|=)", part, maxsplit=1)
        if key not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, "BadRequest", f"field label not supported: {key}")
        pairs.append((key.split(".")[1], op, value))
    return lambda obj: all((obj["metadata"].get(k) == v) == (op != "!=") for k, op, v in pairs)


def json_path(obj: Any, path: str) -> Any:
    """The value at a printer column's JSONPath: `.a.b`, `.a[0]`, `.a[-1:]` and `.a[?(@.k=="v")].b`."""
    value = obj
    for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[([^\]]+)\]", path):
        name, index = part
        if value is None:
            return None
        if name:
            value = value.get(name) if isinstance(value, dict) else None
            continue
        if not isinstance(value, list):
            return None
        filtered = re.match(r"\?\(@\.(\w+)\s*==\s*['\"](.*)['\"]\)", index)
        if filtered:
            items = [v for v in value if isinstance(v, dict) and str(v.get(filtered[1])) == filtered[2]]
            value = items[0] if items else None
        elif index.endswith(":"):
            value = value[int(index[:-1]):][0] if value[int(index[:-1]):] else None
        else:
            value = value[int(index)] if -len(value) <= int(index) < len(value) else None
    return value


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def prune(obj: Any, schema: dict[str, Any] | None, path: str, pruned: list[str]) -> Any:
    """Drop fields the structural schema does not know, as the API server does (paths go to `pruned`)."""
    if schema is None or schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return obj
    if isinstance(obj, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            if properties is not None and key in properties:
                out[key] = prune(value, properties[key], f"{path}.{key}", pruned)
            elif isinstance(extra, dict):
                out[key] = prune(value, extra, f"{path}.{key}", pruned)
            elif properties is None or extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                out[key] = value
            else:
                pruned.append(f"{path}.{key}".lstrip("."))
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], f"{path}[{i}]", pruned) for i, item in enumerate(obj)]
    return obj


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics listed in the module docstring."""

    kinds: dict[Key, Kind] = attrs.field(factory=dict)
    pruned: list[str] = attrs.field(factory=list)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, Key, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _changed: asyncio.Condition | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/(apis/[^/]+/[^/]+|api/v1)")] << self._serve_openapi_gv
        for kind in CORE_KINDS:
            self.register(kind)
        self._put_directly(NAMESPACES, None, {"metadata": {"name": "default"}, "status": {"phase": "Active"}})

    # -- registration -------------------------------------------------------------------------

    def register(self, kind: Kind) -> None:
        self.kinds[kind.key] = kind
        self.resources[kmock.resource(*kind.key)] = kmock.ResourceInfo(
            kind=kind.kind,
            singular=kind.kind.lower(),
            namespaced=kind.namespaced,
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            shortnames=set(kind.short_names),
            categories=set(kind.categories),
            subresources={"status"} if kind.status_subresource else set(),
        )

    def register_crds(self, documents: Iterable[dict[str, Any]]) -> None:
        """Serve every version of every CustomResourceDefinition in `documents` (and list the CRDs)."""
        for crd in documents:
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            self._put_directly(CRDS, None, crd)
            spec = crd["spec"]
            names = spec["names"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                self.register(Kind(
                    group=spec["group"],
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    status_subresource="status" in (version.get("subresources") or {}),
                    short_names=tuple(names.get("shortNames") or ()),
                    categories=tuple(names.get("categories") or ()),
                    printer_columns=version.get("additionalPrinterColumns") or [],
                    schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                ))

    def register_crd_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with Path(path).open() as stream:
                self.register_crds(yaml.load_all(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))

    def kind_of(self, api_version: str, kind_name: str) -> Kind:
        group, _, version = api_version.rpartition("/")
        for kind in self.kinds.values():
            if (kind.group, kind.version, kind.kind) == (group, version, kind_name):
                return kind
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({api_version} {kind_name})")

    # -- the store: used by the HTTP handlers and by the test-side controllers ------------------

    def _put_directly(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Store an object with no event (setup before anyone watches, or from a synchronous context)."""
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=str(self._next_rv()))
        if namespace:
            meta["namespace"] = namespace
        self.objects[(kmock.resource(*kind.key), namespace, meta["name"])] = obj
        return obj

    async def _ensure_namespace(self, namespace: str) -> None:
        if self._stored(NAMESPACES, None, namespace) is None:
            await self.create(NAMESPACES, None, {"metadata": {"name": namespace},
                                                 "status": {"phase": "Active"}})

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    async def _emit(self, key: Key, type_: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"]) if type_ != "DELETED" else self._rv
        self._log.append((rv, key, {"type": type_, "object": copy.deepcopy(obj)}))
        self._log_rvs.append(rv)
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            self._changed.notify_all()

    def _stored(self, kind: Kind, namespace: str | None, name: str) -> kmock.Object | None:
        obj = self.objects._objects.get((kmock.resource(*kind.key), namespace if kind.namespaced else None, name))
        return None if obj is None or obj.deleted else obj

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self._stored(kind, namespace, name)
        return copy.deepcopy(obj.raw) if obj is not None else None

    def list(self, kind: Kind, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:
        by_labels, by_fields = label_selector(labels), field_selector(fields)
        res = kmock.resource(*kind.key)
        items = []
        for (resource, ns, _), obj in self.objects.items():
            if resource != res or obj.deleted or (namespace is not None and ns != namespace):
                continue
            raw = obj.raw
            if by_labels(raw["metadata"].get("labels") or {}) and by_fields(raw):
                items.append(copy.deepcopy(raw))
        return items

    def _validate(self, kind: Kind, obj: dict[str, Any], strict: bool = False) -> dict[str, Any]:
        name = obj["metadata"].get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{kind.kind} "{name}" is invalid: metadata.name: Invalid value: '
                                           f'"{name}": a lowercase RFC 1123 subdomain must consist of ...')
        if kind.schema is None:
            return obj
        body = {k: v for k, v in obj.items() if k != "metadata"}
        pruned: list[str] = []
        body = prune(body, kind.schema, "", pruned)
        if strict and pruned:
            raise ApiError(400, "BadRequest", f'{kind.kind} in version "{kind.version}" cannot be handled as a '
                                              f'{kind.kind}: strict decoding error: '
                                              + ", ".join(f'unknown field "{p}"' for p in pruned))
        self.pruned.extend(f"{kind.kind}/{name}: {p}" for p in pruned)
        errors = sorted(kind.validator.iter_errors({**body, "metadata": obj["metadata"]}),
                        key=lambda e: list(e.absolute_path))
        if errors:
            causes = [{"field": ".".join(str(p) for p in e.absolute_path), "message": e.message} for e in errors]
            text = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
            raise ApiError(422, "Invalid", f'{kind.kind}.{kind.group} "{name}" is invalid: {text}',
                           {"name": name, "kind": kind.plural, "causes": causes})
        return {**body, "metadata": obj["metadata"]}

    async def create(self, kind: Kind, namespace: str | None, body: dict[str, Any],
                     strict: bool = False) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            await self._ensure_namespace(meta["namespace"])
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", f"{kind.kind} is invalid: metadata.name: Required value: name or "
                                               "generateName is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta["name"]
        if self._stored(kind, meta.get("namespace"), name) is not None:
            raise ApiError(409, "AlreadyExists", f'{kind.plural}.{kind.group or "core"} "{name}" already exists',
                           {"name": name, "group": kind.group, "kind": kind.plural})
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        if kind.status_subresource and kind.group:
            obj.pop("status", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("resourceVersion", None)
        obj = self._validate(kind, obj, strict)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        res = kmock.resource(*kind.key)
        key = (res, obj["metadata"].get("namespace") if kind.namespaced else None, name)
        if key in self.objects._objects:
            self.objects._objects[key].create(obj)
        else:
            self.objects[key] = obj
        await self._emit(kind.key, "ADDED", obj)
        return copy.deepcopy(obj)

    async def write(self, kind: Kind, namespace: str | None, name: str, new: dict[str, Any],
                    subresource: str | None = None, expected_rv: str | None = None,
                    strict: bool = False) -> dict[str, Any]:
        """Store `new` as the object's next version with the status-subresource and metadata rules."""
        stored = self._stored(kind, namespace, name)
        if stored is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group or "core"} "{name}" not found',
                           {"name": name, "group": kind.group, "kind": kind.plural})
        current = stored.raw
        if expected_rv and expected_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural} "{name}": the object '
                                            "has been modified; please apply your changes to the latest version")
        new = copy.deepcopy(new)
        if subresource == "status":
            new = {**copy.deepcopy(current), "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif kind.status_subresource and kind.group:
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        meta = new.setdefault("metadata", {})
        for immutable in ("uid", "creationTimestamp", "name", "namespace", "generation", "deletionTimestamp"):
            if immutable in current["metadata"]:
                meta[immutable] = current["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        if new == current:
            return copy.deepcopy(current)
        spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if spec_of(new) != spec_of(current):
            meta["generation"] = current["metadata"].get("generation", 1) + 1
        new = self._validate(kind, new, strict)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return await self._remove(kind, stored, new)
        meta["resourceVersion"] = str(self._next_rv())
        stored.create(new)
        await self._emit(kind.key, "MODIFIED", new)
        return copy.deepcopy(new)

    async def patch(self, kind: Kind, namespace: str | None, name: str, patch: Any,
                    content_type: str = "application/merge-patch+json", subresource: str | None = None,
                    strict: bool = False) -> dict:
        current = self.get(kind, namespace, name)
        if current is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group or "core"} "{name}" not found',
                           {"name": name, "group": kind.group, "kind": kind.plural})
        if "json-patch" in content_type:
            try:
                new = jsonpatch.apply_patch(current, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {error}") from None
            expected = None
        elif "apply-patch" in content_type:
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not emulated")
        else:
            expected = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            new = merge_patch(current, patch)
        return await self.write(kind, namespace, name, new, subresource, expected, strict)

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any]:
        stored = self._stored(kind, namespace, name)
        if stored is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group or "core"} "{name}" not found',
                           {"name": name, "group": kind.group, "kind": kind.plural})
        current = stored.raw
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                       resourceVersion=str(self._next_rv()))
                stored.create(new)
                await self._emit(kind.key, "MODIFIED", new)
                return copy.deepcopy(new)
            return copy.deepcopy(current)
        return await self._remove(kind, stored, current)

    async def _remove(self, kind: Kind, stored: kmock.Object, last: dict[str, Any]) -> dict[str, Any]:
        last = copy.deepcopy(last)
        last["metadata"]["resourceVersion"] = str(self._next_rv())
        stored.delete()
        await self._emit(kind.key, "DELETED", last)
        # The garbage collector deletes dependents in the background (propagationPolicy=Background).
        asyncio.get_running_loop().create_task(self._collect(last["metadata"]["uid"]))
        return last

    async def _collect(self, owner_uid: str) -> None:
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            owners = obj.raw["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in owners):
                kind = self.kinds[(resource.group, resource.version, resource.plural)]
                try:
                    await self.delete(kind, namespace, name)
                except ApiError:
                    pass  # deleted meanwhile

    async def subscribe(self, kinds: Iterable[Kind], since: int = 0, replay: bool = False,
                        timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events for `kinds` after resourceVersion `since` (or the current state first, if `replay`)."""
        keys = {kind.key for kind in kinds}
        if self._changed is None:
            self._changed = asyncio.Condition()
        if replay:
            since = self._rv
            for kind in kinds:
                for obj in self.list(kind):
                    yield {"type": "ADDED", "object": obj}
        position = bisect.bisect_right(self._log_rvs, since)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            while position < len(self._log):
                _, key, event = self._log[position]
                position += 1
                if key in keys:
                    yield copy.deepcopy(event)
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if self._closing or (remaining is not None and remaining <= 0):
                return
            async with self._changed:
                if position >= len(self._log):
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        return

    async def close_watches(self) -> None:
        """End every watch stream (on shutdown: a stream with no events would otherwise hold the server)."""
        self._closing = True
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def created_count(self, kind: Kind, namespace: str, name: str) -> int:
        """How many times an object of that name was created (ADDED) over the server's lifetime."""
        return sum(1 for _, key, event in self._log
                   if key == kind.key and event["type"] == "ADDED"
                   and event["object"]["metadata"]["name"] == name
                   and event["object"]["metadata"].get("namespace") == namespace)

    # -- HTTP: kmock's fallback reactions, overridden ------------------------------------------

    async def _handle(self, request: rendering.Request) -> Any:
        # Skip kmock's own state-tracking in KubernetesEmulator._handle: the fallbacks below keep the
        # state, so a reaction that intercepts a request (an injected 500) changes nothing, as on a
        # real server that failed the request. Resource requests go straight to those fallbacks
        # unless a test added reactions: kmock matches a request by scanning every request served
        # so far, which is quadratic over a long run (see benchmarks/operator_scale.py).
        is_resource = request.resource is not None and bool(request.resource.plural)  # not discovery
        dispatch = self._direct.get(request.action) if is_resource else None
        if is_resource and request.method == kmock.method.PUT and request.name:
            dispatch = self._serve_replace
        if dispatch is not None and not self._has_reactions():
            try:
                return await rendering.Response(payload=await dispatch(request))(request)
            except ApiError as error:
                return await self._render_error(error)
            except kmock.KubernetesError as error:
                return await super()._render_error(error)
        return await kmock.RawHandler._handle(self, request)

    def _has_reactions(self) -> bool:
        """Whether a test added reactions (kmock's fallbacks all sit at priority -inf)."""
        return any(not (p.priorities and p.priorities[0] == -math.inf) for p in self._payloads)

    @property
    def _direct(self) -> dict[Any, Callable[..., Any]]:
        async def watch(request: rendering.Request) -> Any:
            return self._serve_watch(request)

        return {kmock.action.LIST: self._serve_list, kmock.action.FETCH: self._serve_fetch,
                kmock.action.CREATE: self._serve_create, kmock.action.UPDATE: self._serve_update,
                kmock.action.DELETE: self._serve_delete, kmock.action.WATCH: watch}

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, ApiError):
            return await super()._render_error(kmock.KubernetesError(
                status=exc.code, reason=exc.reason, message=exc.message, details=exc.details))
        return await super()._render_error(exc)

    def _kind_for(self, request: rendering.Request) -> Kind:
        res = request.resource
        kind = self.kinds.get((res.group, res.version, res.plural)) if res is not None else None
        if kind is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return kind

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(request: rendering.Request) -> Any:
            try:
                return await fn(request)
            except ApiError as error:
                raise kmock.KubernetesError(status=error.code, reason=error.reason, message=error.message,
                                            details=error.details) from None
        return handler

    async def _serve_list(self, request: rendering.Request) -> Any:
        return await self._wrap(self._list)(request)

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        return await self._wrap(self._fetch)(request)

    async def _serve_create(self, request: rendering.Request) -> Any:
        return await self._wrap(self._create)(request)

    async def _serve_update(self, request: rendering.Request) -> Any:
        return await self._wrap(self._update)(request)

    async def _serve_delete(self, request: rendering.Request) -> Any:
        return await self._wrap(self._delete)(request)

    async def _list(self, request: rendering.Request) -> Any:
        kind = self._kind_for(request)
        items = self.list(kind, request.namespace, request.params.get("labelSelector"),
                          request.params.get("fieldSelector"))
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(kind, items)
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _fetch(self, request: rendering.Request) -> Any:
        kind = self._kind_for(request)
        obj = self.get(kind, request.namespace, request.name)
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group or "core"} "{request.name}" not found',
                           {"name": request.name, "group": kind.group, "kind": kind.plural})
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(kind, [obj])
        return obj

    async def _create(self, request: rendering.Request) -> Any:
        kind = self._kind_for(request)
        if not isinstance(request.data, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = await self.create(kind, request.namespace, request.data, _strict(request))
        return rendering.Response(status=201, payload=obj)

    async def _update(self, request: rendering.Request) -> Any:
        kind = self._kind_for(request)
        content_type = request.headers.get("Content-Type", "application/merge-patch+json")
        return await self.patch(kind, request.namespace, request.name, request.data, content_type,
                                request.subresource, _strict(request))

    async def _serve_replace(self, request: rendering.Request) -> Any:
        kind = self._kind_for(request)
        body = request.data if isinstance(request.data, dict) else {}
        expected = (body.get("metadata") or {}).get("resourceVersion")
        return await self.write(kind, request.namespace, request.name, body, request.subresource, expected,
                                _strict(request))

    async def _delete(self, request: rendering.Request) -> Any:
        return await self.delete(self._kind_for(request), request.namespace, request.name)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        kind = self._kind_for(request)
        yield b""  # send the headers: the stream is open even if nothing happens
        since_text = request.params.get("resourceVersion") or "0"
        timeout = float(request.params.get("timeoutSeconds") or 1800)
        by_labels = label_selector(request.params.get("labelSelector"))
        by_fields = field_selector(request.params.get("fieldSelector"))
        name = request.name
        async for event in self.subscribe([kind], since=int(since_text), replay=since_text == "0",
                                          timeout=timeout):
            obj = event["object"]
            meta = obj["metadata"]
            if request.namespace and meta.get("namespace") != request.namespace:
                continue
            if (name and meta["name"] != name) or not by_fields(obj):
                continue
            if by_labels(meta.get("labels") or {}):
                yield event

    async def _serve_version(self, request: rendering.Request) -> Any:
        # Discovery as a real server gives it: a subresource carries no short names or categories
        # (kmock copies them, and kubectl then warns that `ftj` is ambiguous).
        res = request.resource
        kinds = [k for k in self.kinds.values() if (k.group, k.version) == (res.group, res.version)]
        if not kinds:
            raise kmock.KubernetesResourceNotFoundError()
        resources = []
        for kind in kinds:
            common = {"singularName": kind.kind.lower(), "namespaced": kind.namespaced, "kind": kind.kind}
            resources.append({**common, "name": kind.plural, "shortNames": list(kind.short_names),
                              "categories": list(kind.categories),
                              "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            if kind.status_subresource:
                resources.append({**common, "name": f"{kind.plural}/status", "singularName": "",
                                  "verbs": ["get", "patch", "update"]})
        return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": kinds[0].api_version,
                "resources": resources}

    async def _serve_openapi_root(self, request: rendering.Request) -> Any:
        # OpenAPI v3 is served only as far as kubectl needs it to learn that the server validates
        # fields itself (`fieldValidation` on PATCH): kubectl then sends fieldValidation=Strict.
        paths = {"api/v1" if not k.group else f"apis/{k.group}/{k.version}": None for k in self.kinds.values()}
        return {"paths": {p: {"serverRelativeURL": f"/openapi/v3/{p}"} for p in paths}}

    async def _serve_openapi_gv(self, request: rendering.Request) -> Any:
        gv = request.url.path.removeprefix("/openapi/v3/")
        paths = {}
        for kind in self.kinds.values():
            prefix = f"/api/{kind.version}" if not kind.group else f"/apis/{kind.group}/{kind.version}"
            if prefix.lstrip("/") != gv:
                continue
            scope = "/namespaces/{namespace}" if kind.namespaced else ""
            gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
            operation = {"x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}},
                         "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]}
            paths[f"{prefix}{scope}/{kind.plural}/{{name}}"] = {"patch": operation, "put": operation}
            paths[f"{prefix}{scope}/{kind.plural}"] = {"post": operation}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
                "components": {"schemas": {}}}

    def _table(self, kind: Kind, items: list[dict[str, Any]]) -> dict[str, Any]:
        columns = [c for c in kind.printer_columns if c.get("priority", 0) == 0] or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        definitions += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": 0} for c in columns]

        def cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
            value = json_path(obj, column["jsonPath"])
            if column.get("type") == "date":
                return _age(value)
            return value if isinstance(value, int | float | str | bool) else ("" if value is None else
                                                                             json.dumps(value))

        rows = [{"cells": [obj["metadata"]["name"], *(cell(obj, c) for c in columns)],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj["metadata"]}} for obj in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": definitions, "rows": rows}


def _strict(request: rendering.Request) -> bool:
    return request.params.get("fieldValidation") == "Strict"


class EmulatorThread:
    """The API server on its own event loop in a background thread, listening on 127.0.0.1."""

    def __init__(self, server: ApiServer | None = None) -> None:
        self.server = server or ApiServer()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.server, kmock.Server(self.server, host="127.0.0.1") as http:
            self.url = str(http.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            await self.server.close_watches()

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API emulator did not start")
        return self

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the emulator's loop (from a test thread) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 60) -> Any:
        """Run a plain function on the emulator's loop, so it sees a consistent store."""
        async def call() -> Any:
            return fn()
        return self.call(call(), timeout)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for kubectl, kopf and the `kubernetes` client, pointing at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                           "namespace": namespace}}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path
