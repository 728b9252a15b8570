"""TokenReview and SubjectAccessReview on the Kubernetes API stand-in the operator tests use
(tests/operator/emulator.py: kmock's emulator), for the inference access tests.

Stands in for: kube-apiserver's token authenticator (a table of tokens -> users, as a
ServiceAccount token or an OIDC token resolves) and its RBAC authorizer. RBAC is evaluated for real
over the Role, ClusterRole, RoleBinding and ClusterRoleBinding objects stored in the emulator, so a
test grants access with the objects (or the `kubectl create role/rolebinding` commands) a platform
team would use. Not emulated: aggregated ClusterRoles, non-resource URLs, impersonation.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
import kmock
from kmock._internal import rendering

from tests.operator.emulator import ApiServer, EmulatorThread, Kind

RBAC = "rbac.authorization.k8s.io"
ROLES = Kind(RBAC, "v1", "roles", "Role")
CLUSTER_ROLES = Kind(RBAC, "v1", "clusterroles", "ClusterRole", namespaced=False)
ROLE_BINDINGS = Kind(RBAC, "v1", "rolebindings", "RoleBinding")
CLUSTER_ROLE_BINDINGS = Kind(RBAC, "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False)


def service_account_user(namespace: str, name: str) -> dict[str, Any]:
    """What a TokenReview says of a ServiceAccount's token."""
    return {"username": f"system:serviceaccount:{namespace}:{name}", "uid": f"uid-{namespace}-{name}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]}


def _matches(values: list[str] | None, wanted: str) -> bool:
    return bool(values) and ("*" in values or wanted in values)


def _rule_allows(rule: dict[str, Any], attributes: dict[str, Any]) -> bool:
    return (_matches(rule.get("verbs"), attributes.get("verb", ""))
            and _matches(rule.get("apiGroups"), attributes.get("group", ""))
            and _matches(rule.get("resources"), attributes.get("resource", ""))
            and (not rule.get("resourceNames") or attributes.get("name") in rule["resourceNames"]))


def _subject_is(subject: dict[str, Any], user: str, groups: list[str], namespace: str | None) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return subject.get("name") == user
    if kind == "Group":
        return subject.get("name") in groups
    if kind == "ServiceAccount":
        return user == f"system:serviceaccount:{subject.get('namespace') or namespace}:{subject.get('name')}"
    return False


@attrs.define(kw_only=True)
class ReviewingApiServer(ApiServer):
    """The emulator, answering TokenReview from `tokens` and SubjectAccessReview by RBAC."""

    tokens: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    reviews: list[str] = attrs.field(factory=list)  # "tokenreviews" / "subjectaccessreviews", in order
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in (ROLES, CLUSTER_ROLES, ROLE_BINDINGS, CLUSTER_ROLE_BINDINGS):
            self.register(kind)

    async def _handle(self, request: rendering.Request) -> Any:
        resource = request.resource
        if (resource is not None and request.method == kmock.method.POST
                and resource.plural in ("tokenreviews", "subjectaccessreviews", "selfsubjectaccessreviews")):
            with self._lock:
                self.reviews.append(resource.plural)
            body = request.data if isinstance(request.data, dict) else {}
            spec = body.get("spec") or {}
            if resource.plural == "selfsubjectaccessreviews":  # `kubectl auth can-i --as=...`: the impersonated user
                spec = {**spec, "user": request.headers.get("Impersonate-User", ""),
                        "groups": [g for g in [request.headers.get("Impersonate-Group")] if g]}
            status = (self._token_review(spec) if resource.plural == "tokenreviews"
                      else {"allowed": self._allowed(spec)})
            return await rendering.Response(status=201, payload={**body, "status": status})(request)
        return await super()._handle(request)

    def _token_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        user = self.tokens.get(spec.get("token", ""))
        return {"authenticated": True, "user": user} if user else {"authenticated": False, "error": "invalid token"}

    def _allowed(self, spec: dict[str, Any]) -> bool:
        attributes = spec.get("resourceAttributes") or {}
        namespace = attributes.get("namespace")
        user, groups = spec.get("user", ""), list(spec.get("groups") or [])
        bindings = [(b, namespace) for b in self.list(ROLE_BINDINGS, namespace)] if namespace else []
        bindings += [(b, None) for b in self.list(CLUSTER_ROLE_BINDINGS)]
        for binding, where in bindings:
            if not any(_subject_is(s, user, groups, where) for s in binding.get("subjects") or []):
                continue
            ref = binding.get("roleRef") or {}
            role = (self.get(ROLES, where, ref.get("name", "")) if ref.get("kind") == "Role"
                    else self.get(CLUSTER_ROLES, None, ref.get("name", "")))
            if role and any(_rule_allows(rule, attributes) for rule in role.get("rules") or []):
                return True
        return False


def start_reviewing_emulator(tokens: dict[str, dict[str, Any]]) -> EmulatorThread:
    thread = EmulatorThread()
    thread.server = ReviewingApiServer(tokens=tokens)  # not through the constructor: an unused server is falsy
    return thread.start()
