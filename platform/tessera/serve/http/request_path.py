"""The one path every request to the server takes before its route, as an ASGI middleware.

It gives the request its id (the caller's `x-request-id` when it is a plain token, else a new one;
echoed in the answer and used as the OpenAI response id), times it, and counts it: the one place
where `tessera_requests_total` is incremented. The inference routes tell it which model a request
named (KServe's paths say it themselves). Identity, quota and audit belong here too, as middlewares
wired beside this one in `tessera.serve.app`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from tessera.serve import metrics

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KSERVE_MODEL = re.compile(r"^/v1/models/(?P<v1>[^/]+):predict$|^/v2/models/(?P<v2>[^/]+)/(?:versions/[^/]+/)?infer$")


def inference_endpoint(path: str) -> str | None:
    """The endpoint label of an inference route; None for every other route (health, lists, admin)."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if _KSERVE_MODEL.match(path):
        return "predict"
    return None


def name_model(scope: dict[str, Any], model: str) -> None:
    """Called by a route once it parsed the model a request names: the request is counted under it."""
    scope.setdefault("state", {})["model"] = model


class RequestPath:
    def __init__(self, app: Any, label_of: Any) -> None:
        self.app = app
        self.label_of = label_of  # model name -> bounded metric label (`ModelService.metric_label`)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        state["request_id"] = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        endpoint = inference_endpoint(scope["path"])
        started = time.perf_counter()

        async def answered(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", state["request_id"].encode())]
                if endpoint is not None:
                    metrics.REQUESTS.labels(self._label(scope, state), endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, answered)
        finally:
            if endpoint is not None:
                metrics.HTTP_SECONDS.labels(endpoint).observe(time.perf_counter() - started)

    def _label(self, scope: dict[str, Any], state: dict[str, Any]) -> str:
        model = state.get("model")
        if model is None and (match := _KSERVE_MODEL.match(scope["path"])):
            model = match["v1"] or match["v2"]
        return "unknown" if model is None else self.label_of(model)
