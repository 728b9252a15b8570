"""The inference access middleware, one ASGI class for both runtimes: `tessera serve` adds it to its
app; vLLM loads it with `--middleware=tessera_access.middleware.AccessControl` (the chart ships this
package in a ConfigMap; standard library only, plus prometheus_client when present).

Per request: the bearer token names an identity (401 without one); the model named in the KServe
path or the OpenAI body must be one the identity may `use` (403, whether or not it exists, so no
answer tells which adapters a server holds); the identity's quotas must have room (429 with
Retry-After); the answer's token usage is charged and counted; one audit line is written. Model
lists are filtered to what the caller may use. Refusals use each protocol's own error shape.

The pod's own components (the adapter agent, on loopback, without a token) read the unfiltered
model list; they get nothing else without a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .audit import AuditRecord, audit_logger, emit, prompt_digest
from .guard import is_local
from .identity import ANONYMOUS_LOCAL, Identity
from .kube import KubeUnavailable
from .quota import QuotaExceeded
from .routes import Kind, Protocol, Route, classify, normalize
from .settings import AccessPolicy, AccessSettings
from .usage import close_counter, open_counter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("tessera.access")
# Kept to read `usage` from a JSON answer; larger answers are passed on unread (tokens then unknown).
MAX_INSPECTED_BYTES = 8 << 20
CATALOG_SECONDS = 30.0
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_denied",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}


class Refusal(Exception):
    def __init__(self, status: int, message: str, decision: str, headers: list[tuple[bytes, bytes]] | None = None,
                 quota: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.decision = status, message, decision
        self.headers, self.quota = headers or [], quota


def error_body(protocol: Protocol, status: int, message: str) -> bytes:
    """OpenAI's error object on OpenAI routes (the openai SDK maps the status to its exception);
    KServe's `{"error": ...}` on KServe routes."""
    if protocol is Protocol.KSERVE:
        return json.dumps({"error": message}).encode()
    return json.dumps({"error": {"message": message, "type": _TYPES.get(status, "error"), "param": None,
                                 "code": status}}).encode()


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == wanted:
            return value.decode("latin-1")
    return None


def resource_name(model: str) -> str:
    """The RBAC resource name of a model: its name, the base by the last part of its name (KServe's
    routes cannot address a slash, so `org/base` is `base` there: one name for both protocols)."""
    return model.rsplit("/", 1)[-1]


def listed_models(body: Any) -> list[str]:
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return [c["id"] for c in body["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
    if isinstance(body, dict) and isinstance(body.get("models"), list):
        return [m if isinstance(m, str) else m.get("name", "") for m in body["models"]]
    return []


def keep_models(body: Any, allowed: set[str]) -> Any:
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return {**body, "data": [c for c in body["data"] if isinstance(c, dict) and c.get("id") in allowed]}
    if isinstance(body, dict) and isinstance(body.get("models"), list):
        return {**body, "models": [m for m in body["models"]
                                   if (m if isinstance(m, str) else m.get("name")) in allowed]}
    return body


def usage_of(payload: Any) -> tuple[int, int] | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class _Answer:
    """What the middleware learns from the answer it passes on: status and token usage."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.status = 0
        self.sse = False
        self.strip_usage_chunk = strip_usage_chunk
        self.kept = bytearray()
        self.pending = b""
        self.usage: tuple[int, int] | None = None

    def events(self, chunk: bytes, final: bool) -> bytes:
        """Whole server-sent events of `chunk` (with what came before), the usage-only one dropped
        when the usage was asked for by the middleware rather than by the client."""
        data = self.pending + chunk
        complete, separator, self.pending = data.rpartition(b"\n\n")
        if final:
            complete, separator, self.pending = data, b"", b""
        out = []
        for event in (complete + separator).split(b"\n\n"):
            if not event:
                continue
            text = event.strip()
            if text.startswith(b"data:") and text[5:].strip() != b"[DONE]":
                try:
                    payload = json.loads(text[5:])
                except ValueError:
                    payload = None
                found = usage_of(payload)
                if found is not None:
                    self.usage = found
                    if self.strip_usage_chunk and not payload.get("choices"):
                        continue
            out.append(event + b"\n\n")
        return b"".join(out)


class AccessControl:
    """ASGI middleware: identity, per-model authorization, quotas, audit; see the module docstring."""

    def __init__(self, app: ASGIApp, settings: AccessSettings | None = None,
                 policy: AccessPolicy | None = None) -> None:
        self.app = app
        self.policy = policy or AccessPolicy.build(settings or AccessSettings.from_environment())
        self.audit = audit_logger(self.policy.settings.audit_file)
        self._catalog_at = -CATALOG_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = classify(scope.get("method", "GET"), scope.get("path", ""))
        if route.kind is Kind.EXEMPT:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if route.kind is Kind.LIST and token is None and is_local(scope):
            await self._list(scope, receive, send, ANONYMOUS_LOCAL, route)  # the agent in the pod: unfiltered
            return
        started = time.perf_counter()
        record = AuditRecord(request_id=header(scope, b"x-request-id") or uuid.uuid4().hex,
                             route=f"{scope.get('method', 'GET')} {normalize(scope.get('path', ''))}",
                             namespace=self.policy.namespace, base=self.policy.base)
        admission = None
        try:
            identity = await self._identify(token)
            record.subject, record.groups = identity.subject, list(identity.groups)
            if route.kind is Kind.LIST:
                await self._list(scope, receive, send, identity, route, record)
                return
            if route.kind is Kind.OTHER:
                await self._pass(scope, receive, send, record)
                return
            body, parsed = await self._read_body(scope, receive, route)
            model = route.model or (parsed.get("model") if isinstance(parsed, dict) else None)
            if not isinstance(model, str) or not model:
                if self.policy.open_access:  # nothing to authorize: the runtime answers in its own words
                    await self._pass(scope, _replay(body, receive), send, record)
                    return
                # Not even a body the runtime could not read passes: vLLM reads `model` from multipart forms too.
                raise Refusal(400, "the request must be JSON naming its model (`model`)", "invalid")
            if not await self._allowed(identity, model):
                raise Refusal(403, "this identity may not use the model named in the request", "denied")
            await self._refresh_catalog(scope, model)
            record.base = self.policy.base
            record.adapter = None if self._is_base(model) else model
            record.version = self.policy.models.get(model)
            if route.inference:
                record.prompt_sha256 = prompt_digest(_prompt(parsed))
                if self.policy.settings.audit_include_content:
                    record.prompt = _prompt(parsed)
            try:
                admission = self.policy.quotas.admit(identity)
            except QuotaExceeded as exceeded:
                raise Refusal(429, f"quota exceeded ({exceeded.limit}); retry after {exceeded.retry_after} s",
                              "rate_limited", [(b"retry-after", str(exceeded.retry_after).encode())],
                              exceeded.limit) from None
            strip = False
            streamed = isinstance(parsed, dict) and parsed.get("stream")
            if route.inference and route.protocol is Protocol.OPENAI and streamed:
                options = parsed.get("stream_options") if isinstance(parsed.get("stream_options"), dict) else {}
                if not options.get("include_usage"):
                    # Ask for the usage chunk to charge the stream, and drop it from what the client gets.
                    parsed["stream_options"] = {**options, "include_usage": True}
                    body, strip = json.dumps(parsed).encode(), True
            answer = _Answer(strip)
            counted, counting = open_counter()
            try:
                await self.app(_with_length(scope, len(body)), _replay(body, receive), self._watch(send, answer))
            finally:
                close_counter(counting)
                record.status = answer.status or 500
                usage = answer.usage or (_parse_usage(answer.kept) if not answer.sse else None) or tuple(counted)
                record.tokens_in, record.tokens_out = usage
                self.policy.quotas.release(admission, record.tokens_in + record.tokens_out)
        except Refusal as refusal:
            record.status, record.decision, record.quota = refusal.status, refusal.decision, refusal.quota
            headers = [(b"www-authenticate", b"Bearer")] if refusal.status == 401 else refusal.headers
            await send_json(send, refusal.status, error_body(route.protocol, refusal.status, refusal.message), headers)
        finally:
            record.latency_ms = round((time.perf_counter() - started) * 1000, 3)
            emit(self.audit, record)

    async def _identify(self, token: str | None) -> Identity:
        if self.policy.open_access:
            return await self.policy.authenticator.authenticate(token or "")  # type: ignore[return-value]
        if token is None:
            raise Refusal(401, "a valid bearer token is required", "unauthenticated")
        try:
            identity = await self.policy.authenticator.authenticate(token)
        except KubeUnavailable as error:
            log.error("authentication unavailable: %s", error)
            raise Refusal(503, "access control is unavailable; retry", "unavailable") from None
        if identity is None:
            raise Refusal(401, "a valid bearer token is required", "unauthenticated")
        return identity

    async def _read_body(self, scope: Scope, receive: Receive, route: Route) -> tuple[bytes, Any]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Refusal(400, "the client went away", "invalid")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.policy.settings.max_body_bytes:
                raise Refusal(413, "the request body is too large", "invalid")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if route.model is not None and not route.inference:
            return body, None
        try:
            return body, json.loads(body) if body else None
        except ValueError:
            return body, None  # KServe's binary (v2) bodies name the model in the path

    async def _allowed(self, identity: Identity, model: str) -> bool:
        try:
            return await self.policy.authorizer.allowed(identity, resource_name(model))
        except KubeUnavailable as error:
            log.error("authorization unavailable: %s", error)
            raise Refusal(503, "access control is unavailable; retry", "unavailable") from None

    def _watch(self, send: Send, answer: _Answer) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                content_type = dict((k.lower(), v) for k, v in message.get("headers") or ()).get(b"content-type", b"")
                answer.sse = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                chunk, more = message.get("body", b""), message.get("more_body", False)
                if answer.sse:
                    message = {**message, "body": answer.events(chunk, not more)}
                elif len(answer.kept) + len(chunk) <= MAX_INSPECTED_BYTES:
                    answer.kept += chunk
            await send(message)
        return watched

    async def _pass(self, scope: Scope, receive: Receive, send: Send, record: AuditRecord) -> None:
        answer = _Answer(False)
        try:
            await self.app(scope, receive, self._watch(send, answer))
        finally:
            record.status = answer.status or 500

    async def _list(self, scope: Scope, receive: Receive, send: Send, identity: Identity, route: Route,
                    record: AuditRecord | None = None) -> None:
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self._learn(body)
        if body is not None and identity is not ANONYMOUS_LOCAL:
            names = listed_models(body)
            verdicts = await asyncio.gather(*(self._allowed(identity, n) for n in names), return_exceptions=True)
            body = keep_models(body, {n for n, ok in zip(names, verdicts, strict=True) if ok is True})
            raw = json.dumps(body).encode()
        if record is not None:
            record.status = start.get("status", 500)
        headers = [(k, v) for k, v in start.get("headers") or () if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    def _is_base(self, model: str) -> bool:
        """The base by either of its names (`org/base` on OpenAI routes, `base` on KServe's)."""
        return self.policy.base is not None and resource_name(model) == resource_name(self.policy.base)

    async def _refresh_catalog(self, scope: Scope, model: str) -> None:
        """Ask the runtime's own model list (in process, not over the network) when `model` is new to
        the catalog or the catalog is older than CATALOG_SECONDS: versions change on a reload."""
        now = time.monotonic()
        if (model in self.policy.models or self._is_base(model)) and now - self._catalog_at < CATALOG_SECONDS:
            return
        self._catalog_at = now
        chunks: list[bytes] = []

        async def nothing() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        listing = {**scope, "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"",
                   "headers": [(b"accept", b"application/json")]}
        try:
            await self.app(listing, nothing, capture)
            self._learn(json.loads(b"".join(chunks)))
        except Exception as error:  # noqa: BLE001 - the audit line then lacks the version, the request goes on
            log.warning("could not read the runtime's model list: %s", type(error).__name__)

    def _learn(self, body: Any) -> None:
        """Versions and the base name from the runtime's own model list (the agent reads it every few
        seconds): Tessera's cards carry `sha256`; vLLM's `root` is the agent's `<name>/<sha256>` path."""
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return
        for card in body["data"]:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            if card.get("parent") is None and "parent" in card:
                self.policy.base = card["id"]
                continue
            version = card.get("sha256")
            if not version and isinstance(card.get("root"), str):
                tail = card["root"].rstrip("/").rsplit("/", 1)[-1]
                version = tail if len(tail) == 64 else None
            self.policy.models[card["id"]] = version


def _prompt(parsed: Any) -> Any:
    if not isinstance(parsed, dict):
        return None
    for key in ("prompt", "messages", "input", "instances", "inputs"):
        if key in parsed:
            return parsed[key]
    return None


def _parse_usage(kept: bytearray) -> tuple[int, int] | None:
    try:
        return usage_of(json.loads(bytes(kept)))
    except ValueError:
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # disconnects reach the app as before
    return replay


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}
