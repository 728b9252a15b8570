"""One mapper from every refusal to each protocol's error shape, installed on the app.

OpenAI routes (and vLLM's adapter API, which nests its errors the same way) answer
`{"error": {"message", "type", "param", "code"}}`; KServe routes answer KServe's `{"error": message}`.
A client error is logged as one line, without a traceback; only an unexpected failure is logged
with its traceback, and its answer says nothing about the server's internals.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady
from starlette.exceptions import HTTPException

from tessera.serve.errors import ServeError

log = logging.getLogger(__name__)

_OPENAI_TYPES = {403: "permission_error", 404: "invalid_request_error", 413: "invalid_request_error",
                 500: "internal_error", 503: "service_unavailable"}


def is_kserve_route(path: str) -> bool:
    """KServe's own routes: all of v2, and v1's `:predict`/`:explain` (v1's model list and model
    ready are shared with OpenAI's `/v1/models`)."""
    return path == "/v2" or path.startswith("/v2/") or (
        path.startswith("/v1/models/") and path.endswith((":predict", ":explain")))


def _validation_error(error: RequestValidationError) -> ServeError:
    """One message naming each field at fault. For a field of several accepted types (a prompt is a
    text or a list), the reason a value of the right kind was refused wins over "should be a list"."""
    by_field: dict[str, list[tuple[str, str]]] = {}
    for item in error.errors():
        if item["type"] == "json_invalid":
            # FastAPI puts the character position where the field name would be.
            reason = (item.get("ctx") or {}).get("error", "invalid JSON")
            position = item["loc"][-1] if len(item["loc"]) > 1 else "?"
            return ServeError(f"the request body is not valid JSON: {reason} (at character {position})",
                              code="invalid_json")
        # Leave out pydantic's names of union members, e.g. `function-after[...]`, `list[int]`.
        field = ".".join(str(p) for p in item["loc"] if p != "body" and "[" not in str(p))
        by_field.setdefault(field, []).append((item["type"], item["msg"].removeprefix("Value error, ")))
    problems = []
    for field, reasons in by_field.items():
        chosen = [msg for kind, msg in reasons if kind == "value_error"] or [msg for _, msg in reasons]
        problems.append(f"{field}: {'; '.join(dict.fromkeys(chosen))}" if field else "; ".join(chosen))
    param = next((field for field in by_field if field), None)
    return ServeError("; ".join(problems) or "invalid request", code="invalid_request", param=param)


class BodyTooLarge(HTTPException):
    """Raised while a body arrives: an HTTPException, because FastAPI turns any other exception raised
    while it reads a body into a 400."""

    def __init__(self, error: ServeError) -> None:
        super().__init__(error.status, error.message)
        self.error = error


def as_serve_error(error: BaseException) -> ServeError:
    """Every exception a request can end with, as the boundary's one error type."""
    if isinstance(error, ServeError):
        return error
    if isinstance(error, BodyTooLarge):
        return error.error
    if isinstance(error, RequestValidationError):
        return _validation_error(error)
    if isinstance(error, InvalidInput):
        return ServeError(str(error), code="invalid_input")
    if isinstance(error, ModelNotFound):
        return ServeError(str(error), status=404, code="model_not_found", param="model")
    if isinstance(error, ModelNotReady | ServerNotReady | ServerNotLive):
        return ServeError(str(error), status=503, code="not_ready")
    if isinstance(error, HTTPException):
        return ServeError(str(error.detail), status=error.status_code, code="http_error")
    return ServeError("internal error: the server failed to answer this request; see the server log",
                      status=500, code="internal_error")


def openai_body(error: ServeError) -> dict[str, Any]:
    kind = error.type or _OPENAI_TYPES.get(error.status, "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def kserve_body(error: ServeError) -> dict[str, Any]:
    return {"error": error.message}


def error_response(path: str, error: ServeError) -> JSONResponse:
    body = kserve_body(error) if is_kserve_route(path) else openai_body(error)
    return JSONResponse(body, status_code=error.status)


async def handle(request: Request, exception: Exception) -> JSONResponse:
    error = as_serve_error(exception)
    where = f"{request.method} {request.url.path}"
    if error is not exception and error.code == "internal_error":
        log.error("%s failed", where, exc_info=exception)
    else:
        log.info("%s -> %d %s: %s", where, error.status, error.code, error.message)
    return error_response(request.url.path, error)


def _too_large(max_bytes: int) -> ServeError:
    return ServeError(f"the request body is larger than this server accepts ({max_bytes} bytes)", status=413,
                      code="request_too_large")


class limit_body_size:  # noqa: N801 - used as a middleware factory: app.add_middleware(limit_body_size, ...)
    """Refuse a body over `max_bytes` with 413, by its Content-Length or, when chunked, as it arrives
    (so it is never held in memory whole)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = _too_large(self.max_bytes)
            log.info("%s %s -> 413 %s: %s", scope["method"], scope["path"], error.code, error.message)
            await error_response(scope["path"], error)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(_too_large(self.max_bytes))  # answered by `handle`, in the route's shape
            return message

        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as error:
            # A middleware inside this one (the access check) read the body before any route did.
            if started:
                raise
            await error_response(scope["path"], error.error)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (ServeError, RequestValidationError, HTTPException, InvalidInput, ModelNotFound, ModelNotReady,
                 ServerNotLive, ServerNotReady, Exception):
        app.add_exception_handler(kind, handle)
