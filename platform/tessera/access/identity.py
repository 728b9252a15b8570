"""Who is calling: the identity behind a bearer token, checked by Kubernetes (TokenReview) or read
from a keys file; and whether that identity may use a model (SubjectAccessReview, or the keys file's
grants). Each mode is one authenticator and one authorizer; the middleware only sees the protocols.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .kube import KubeApi, KubeUnavailable, TtlCache

# Access is decided per model name: `use` on adapters.tessera.dev/<name> (the base model too).
API_GROUP = "tessera.dev"
RESOURCE = "adapters"
VERB = "use"
TOKEN_TTL_SECONDS = 60.0
DENIED_TOKEN_TTL_SECONDS = 10.0
DECISION_TTL_SECONDS = 30.0
CACHE_SIZE = 4096


@dataclass(frozen=True)
class Identity:
    subject: str
    groups: tuple[str, ...] = ()
    uid: str | None = None
    extra: dict[str, list[str]] = field(default_factory=dict, compare=False, hash=False)


ANONYMOUS_LOCAL = Identity("system:pod-local")


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Identity | None: ...


class Authorizer(Protocol):
    async def allowed(self, identity: Identity, model: str) -> bool: ...


def token_digest(token: str) -> str:
    """How a token is keyed in caches and keys files: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenReviewAuthenticator:
    """A ServiceAccount or OIDC token, checked by the API server; answers cached briefly, bounded."""

    def __init__(self, kube: KubeApi, audiences: list[str] | None = None, cache_size: int = CACHE_SIZE,
                 ttl: float = TOKEN_TTL_SECONDS) -> None:
        self.kube, self.audiences = kube, audiences or []
        self.cache: TtlCache[str, Identity | bool] = TtlCache(cache_size, ttl)

    async def authenticate(self, token: str) -> Identity | None:
        key = token_digest(token)
        cached = self.cache.get(key)
        if cached is not None:
            return cached if isinstance(cached, Identity) else None
        status = (await self.kube.token_review(token, self.audiences)).get("status") or {}
        if not status.get("authenticated"):
            self.cache.put(key, False, DENIED_TOKEN_TTL_SECONDS)
            return None
        user = status.get("user") or {}
        identity = Identity(str(user.get("username", "")), tuple(user.get("groups") or ()), user.get("uid"),
                            dict(user.get("extra") or {}))
        if not identity.subject:
            raise KubeUnavailable("TokenReview answered authenticated without a username")
        self.cache.put(key, identity)
        return identity


class SubjectAccessReviewAuthorizer:
    """`kubectl auth can-i use adapters.tessera.dev/<model> -n <namespace>`, asked for the caller."""

    def __init__(self, kube: KubeApi, namespace: str, cache_size: int = CACHE_SIZE,
                 ttl: float = DECISION_TTL_SECONDS) -> None:
        self.kube, self.namespace = kube, namespace
        self.cache: TtlCache[tuple[str, tuple[str, ...], str], bool] = TtlCache(cache_size, ttl)

    async def allowed(self, identity: Identity, model: str) -> bool:
        key = (identity.subject, identity.groups, model)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        answer = await self.kube.subject_access_review(
            identity.subject, list(identity.groups), identity.uid, identity.extra,
            {"namespace": self.namespace, "verb": VERB, "group": API_GROUP, "resource": RESOURCE, "name": model})
        allowed = bool((answer.get("status") or {}).get("allowed"))
        self.cache.put(key, allowed)
        return allowed


class KeysFileError(ValueError):
    pass


@dataclass(frozen=True)
class Grant:
    subject: str | None
    group: str | None
    models: frozenset[str]


class KeyRing:
    """The keys file (a mounted Secret), for the embedded mode and clusters without TokenReview:

        {"keys": {"<sha256 of the key>": {"subject": "alice", "groups": ["wealth-desk"]}},
         "grants": [{"group": "wealth-desk", "models": ["wealth-sentiment"]},
                    {"subject": "ops", "models": ["*"]}]}

    Only key hashes are stored (`printf %s "$KEY" | sha256sum`); grants are RBAC's rule in small:
    a subject, or any member of a group, may use the models listed ("*": all).
    """

    def __init__(self, keys: dict[str, Identity], grants: list[Grant]) -> None:
        self.keys, self.grants = keys, grants

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            # The reason, never the content: the file holds key material.
            raise KeysFileError(f"keys file {path}: cannot be read as JSON ({type(error).__name__})") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), dict):
            raise KeysFileError(f"keys file {path}: expected an object with a 'keys' object")
        keys: dict[str, Identity] = {}
        for position, (digest, entry) in enumerate(document["keys"].items(), start=1):
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise KeysFileError(f"keys file {path}: key #{position} is not a hex SHA-256 of the key")
            if not isinstance(entry, dict) or not isinstance(entry.get("subject"), str) or not entry["subject"]:
                raise KeysFileError(f"keys file {path}: key #{position} has no subject")
            keys[digest.lower()] = Identity(entry["subject"], tuple(str(g) for g in entry.get("groups") or ()))
        grants = []
        for position, entry in enumerate(document.get("grants") or [], start=1):
            if (not isinstance(entry, dict) or not (entry.get("subject") or entry.get("group"))
                    or not isinstance(entry.get("models"), list)):
                raise KeysFileError(f"keys file {path}: grant #{position} needs a subject or group and models")
            grants.append(Grant(entry.get("subject"), entry.get("group"), frozenset(map(str, entry["models"]))))
        return cls(keys, grants)

    async def authenticate(self, token: str) -> Identity | None:
        return self.keys.get(token_digest(token))

    async def allowed(self, identity: Identity, model: str) -> bool:
        return any((grant.subject == identity.subject or (grant.group is not None and grant.group in identity.groups))
                   and (model in grant.models or "*" in grant.models) for grant in self.grants)


class AllowAll:
    """`auth.mode: none`: everyone is anonymous and may use everything (chosen explicitly, warned)."""

    async def authenticate(self, token: str) -> Identity | None:
        return Identity("system:anonymous")

    async def allowed(self, identity: Identity, model: str) -> bool:
        return True
