"""The one error type of the serving boundary.

Anything the server refuses or cannot serve is a `ServeError`: the engine, the registry and the
request parsers raise it, and `tessera.serve.http.errors` turns it into each protocol's error shape.
Its message is written for the client: never a traceback, file content or environment.
"""

from __future__ import annotations

from tessera.errors import CodedError


class ServeError(CodedError):
    """`status` is the HTTP status (by default the one `tessera.errors.ERROR_STATUS` gives `code`), `code`
    a stable machine-readable reason, `param` the request field at fault (OpenAI's `param`), `type` the
    error type where a protocol fixes one (vLLM's adapter API)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "invalid_request",
                 param: str | None = None, type: str | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.param = param
        self.type = type


def model_not_found(name: str) -> ServeError:
    """OpenAI's words for a model the server does not serve (vLLM says the same)."""
    return ServeError(f"The model `{name}` does not exist.", status=404, code="model_not_found", param="model")


def repository_model_not_found(name: str) -> ServeError:
    """KServe's words (its `ModelNotFound`) for a model its repository cannot load."""
    return ServeError(f"Model with name {name} does not exist.", status=404, code="model_not_found")
