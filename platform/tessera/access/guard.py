"""An ASGI middleware that keeps a runtime's adapter API to callers inside its own pod.

Both runtimes use it: vLLM loads it with --middleware, `tessera serve` with
`--adapter-api-loopback-only`. vLLM serves `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`
on its inference port, with no authentication of their own (and `tessera serve` KServe's repository
load/unload too), so a NetworkPolicy cannot admit callers to completions and refuse them the
adapter API. The adapter agent calls that API over the pod's loopback: this middleware
answers 403 to anyone else. The chart ships this file to vLLM in a ConfigMap and loads it with
`--middleware=tessera_adapter_guard.LoopbackOnlyAdapterApi`, so it imports nothing but the
standard library. Behind a sidecar proxy that connects from loopback (Istio's sidecar mode) every
caller looks local: there, rely on the mesh's own authorization policy instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# Matched on the path with slashes collapsed and any trailing one dropped, under any prefix (root_path):
# vLLM's adapter API, and KServe's model repository API, which `tessera serve` also answers.
_ADAPTER_API = re.compile(r"/(load|unload)_lora_adapter$|/v2/repository/models/[^/]+/(load|unload)$")
_REFUSAL = json.dumps({"error": {
    "message": "the adapter API answers only the adapter agent of this pod; load adapters through the agent",
    "type": "PermissionDenied", "param": None, "code": 403}}).encode()


def is_adapter_api(path: str) -> bool:
    normalized = re.sub(r"/+", "/", path).rstrip("/")
    return bool(_ADAPTER_API.search(normalized.lower()))


def is_local(scope: Scope) -> bool:
    client = scope.get("client")
    return bool(client) and client[0] in LOOPBACK


class LoopbackOnlyAdapterApi:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_adapter_api(scope.get("path", "")) and not is_local(scope):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(_REFUSAL)).encode())]})
            await send({"type": "http.response.body", "body": _REFUSAL})
            return
        await self.app(scope, receive, send)
