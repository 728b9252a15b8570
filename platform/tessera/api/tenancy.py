"""A namespace is a tenant: which store locations an object in namespace N may name.

The one owner of the rule that the API's validation, the operator, the adapter agent and (as CEL,
from the same values) the chart's ValidatingAdmissionPolicy apply:

- a job's store root is one of the roots the platform admin lists (the chart's store), so its
  artifacts land under `<root>/jobs/<N>/<job>/` and nowhere else;
- every URI it reads (dataset, evaluation data, base model, an Adapter's artifact and base) lies
  under one of N's own prefixes, `<root>/{datasets,jobs,adapters,experiments}/<N>/`, or under a
  shared read-only prefix the admin lists (`<root>/models/` by default).

Paths are compared after `tessera.store.uri.parse_uri`, segment by segment, so `..`, `.`, doubled
slashes and (for file://) percent-encoding cannot step out of a prefix. The installation may run
without tenancy (`enforced=False`: the embedded mode, a single-team cluster that opted out).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tessera.api.adapter import Adapter
from tessera.api.finetunejob import FineTuneJob
from tessera.errors import InvalidSpecError, StoreError
from tessera.store.uri import Location, parse_uri

# The areas of the store layout that belong to one namespace (ARCHITECTURE.md, Artifact layout).
TENANT_AREAS = ("datasets", "jobs", "adapters", "experiments")
DEFAULT_SHARED_PREFIXES = ("models",)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclass(frozen=True)
class TenancyRules:
    """The admin's choices: the store roots tenants share, and the read-only prefixes under them."""

    roots: tuple[str, ...] = ()
    shared_prefixes: tuple[str, ...] = DEFAULT_SHARED_PREFIXES
    # Off only by the admin's choice; enforced with no roots, nothing is allowed.
    enforced: bool = True

    def tenant_prefixes(self, namespace: str) -> list[str]:
        """N's own prefixes under every root: what N may read and (its store key) write."""
        return [_join(root, area, namespace) for root in self.roots for area in TENANT_AREAS]

    def shared(self) -> list[str]:
        return [_join(root, prefix.strip("/")) for root in self.roots for prefix in self.shared_prefixes]

    def readable_prefixes(self, namespace: str) -> list[str]:
        return [*self.tenant_prefixes(namespace), *self.shared()]

    def read_problem(self, path: str, uri: str, namespace: str) -> str | None:
        """Why an object in `namespace` may not read `uri` (None: it may)."""
        try:
            location = parse_uri(uri)
        except StoreError as error:
            return f"{path}: {error}"
        if any(location.within(prefix) for prefix in _locations(self.readable_prefixes(namespace))):
            return None
        return (f"{path}: {uri} is outside namespace {namespace}'s store prefixes; it may name only "
                f"{_listing(self.tenant_prefixes(namespace)[:len(TENANT_AREAS)])} or the shared read-only "
                f"{_listing(self.shared()) or '(none)'}")

    def root_problem(self, path: str, uri: str) -> str | None:
        """Why `uri` cannot be a job's store root: it must be one the admin lists."""
        location = _parse(uri)
        if location is not None and any(location == _parse(root) for root in self.roots):
            return None
        return (f"{path}: {uri} is not a store root of this installation; use "
                f"{_listing(self.roots) or '(none configured: the chart sets store.uri)'}")

    def problems(self, namespace: str, reads: Iterable[tuple[str, str | None]],
                 roots: Iterable[tuple[str, str | None]] = ()) -> list[str]:
        """Every `field: reason` problem of an object in `namespace` naming these URIs (None: unset)."""
        if not self.enforced:
            return []
        found = [self.root_problem(path, uri) for path, uri in roots if uri]
        found += [self.read_problem(path, uri, namespace) for path, uri in reads if uri]
        return [problem for problem in found if problem]


class PolicyError(InvalidSpecError):
    """An object the API's schema accepts but the installation's tenancy policy refuses; `reason`
    is the status reason and Event reason the operator reports."""

    def __init__(self, problems: list[str], reason: str) -> None:
        super().__init__(problems)
        self.reason = reason


@dataclass(frozen=True)
class SchedulingAllowlist:
    """The placement a tenant may ask for (the chart's tenancy.scheduling values; default: none).

    A toleration is allowed when it equals one listed; a node selector entry when its value is
    listed for its key; a priority class when listed."""

    tolerations: tuple[dict[str, Any], ...] = ()
    node_selectors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    priority_classes: tuple[str, ...] = ()

    def problems(self, node_selector: dict[str, str], tolerations: list[dict[str, Any]],
                 priority_class_name: str | None) -> list[str]:
        found = [f"spec.scheduling.nodeSelector: {key}={value} is not allowed by this installation "
                 f"(allowed: {_pairs(self.node_selectors)})"
                 for key, value in node_selector.items() if value not in self.node_selectors.get(key, ())]
        found += [f"spec.scheduling.tolerations[{i}]: {_toleration(t)} is not allowed by this installation "
                  f"(allowed: {', '.join(map(_toleration, self.tolerations)) or 'none'})"
                  for i, t in enumerate(tolerations) if _normal(t) not in map(_normal, self.tolerations)]
        if priority_class_name and priority_class_name not in self.priority_classes:
            found.append(f"spec.scheduling.priorityClassName: {priority_class_name} is not allowed by this "
                         f"installation (allowed: {', '.join(self.priority_classes) or 'none'})")
        return found


def _normal(toleration: dict[str, Any]) -> dict[str, Any]:
    # `operator: Equal` is Kubernetes' default: a toleration that leaves it out is the same one.
    return {"operator": "Equal", **{k: v for k, v in toleration.items() if v not in (None, "")}}


def _toleration(toleration: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(_normal(toleration).items())) + "}"


def _pairs(allowed: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(f"{key}={value}" for key, values in allowed.items() for value in values) or "none"


def _parse(uri: str) -> Location | None:
    try:
        return parse_uri(uri)
    except StoreError:
        return None


def _locations(uris: Iterable[str]) -> list[Location]:
    return [location for location in map(_parse, uris) if location is not None]


def _listing(prefixes: Iterable[str]) -> str:
    return ", ".join(f"{prefix.rstrip('/')}/" for prefix in prefixes)


def job_problems(job: FineTuneJob, rules: TenancyRules) -> list[str]:
    """The tenancy problems of a FineTuneJob: its store root, and what it reads."""
    spec = job.spec
    return rules.problems(job.metadata.namespace,
                          [("spec.baseModel.uri", spec.base_model.uri), ("spec.dataset.uri", spec.dataset.uri),
                           ("spec.dataset.evalUri", spec.dataset.eval_uri)],
                          [("spec.store.uri", spec.store.uri)])


def adapter_problems(adapter: Adapter, rules: TenancyRules) -> list[str]:
    """The tenancy problems of an Adapter: its artifact and its base model."""
    return rules.problems(adapter.metadata.namespace,
                          [("spec.uri", adapter.spec.uri), ("spec.baseModel.uri", adapter.spec.base_model.uri)])
