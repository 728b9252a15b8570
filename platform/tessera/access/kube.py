"""The two Kubernetes API calls inference access makes (TokenReview, SubjectAccessReview), and the
bounded, short-lived cache in front of them.

Standard library only: this package is also shipped into vLLM's image in a ConfigMap, where neither
the `kubernetes` client nor Tessera is installed. The calls are blocking `urllib` requests run in a
worker thread; with the caches in front, a steady caller costs one review per TTL.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REVIEW_TIMEOUT_SECONDS = 5.0

K = TypeVar("K")
V = TypeVar("V")


class KubeUnavailable(Exception):
    """The API server did not answer a review; the caller answers 503, never 'allowed'."""


class TtlCache(Generic[K, V]):
    """At most `size` entries, each valid for `ttl` seconds; the least recently used goes first."""

    def __init__(self, size: int, ttl: float, clock: Any = time.monotonic) -> None:
        self.size, self.ttl, self.clock = size, ttl, clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        self._entries[key] = (self.clock() + (self.ttl if ttl is None else ttl), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class KubeApi:
    """Where the API server is and how this pod authenticates to it (its ServiceAccount token)."""

    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("auth mode kubernetes needs the Kubernetes API: not in a pod (no "
                             "KUBERNETES_SERVICE_HOST) and no API URL given")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT_DIR / "token", SERVICE_ACCOUNT_DIR / "ca.crt")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token_file is not None:
            # Re-read each time: projected ServiceAccount tokens rotate.
            headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
        context = None
        if self.url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        request = urllib.request.Request(self.url.rstrip("/") + path, data=json.dumps(body).encode(),  # noqa: S310
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REVIEW_TIMEOUT_SECONDS, context=context) as response:  # noqa: S310
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            # The reason only: the token never appears in what is raised or logged.
            status = getattr(error, "code", None)
            raise KubeUnavailable(f"{path.rsplit('/', 1)[-1]} failed: "
                                  f"{f'HTTP {status}' if status else type(error).__name__}") from None

    async def review(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._post, path, body)

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = audiences
        return await self.review("/apis/authentication.k8s.io/v1/tokenreviews",
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})

    async def subject_access_review(self, user: str, groups: list[str], uid: str | None,
                                    extra: dict[str, list[str]] | None,
                                    attributes: dict[str, str]) -> dict[str, Any]:
        spec: dict[str, Any] = {"user": user, "groups": groups, "resourceAttributes": attributes}
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = extra
        return await self.review("/apis/authorization.k8s.io/v1/subjectaccessreviews",
                                 {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                                  "spec": spec})


def pod_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (its ServiceAccount's), where adapters are authorized."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or default
    except OSError:
        return default
