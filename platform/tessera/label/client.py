"""The teacher's endpoint: an OpenAI-compatible `/chat/completions` (vLLM, KServe, `tessera serve`), over httpx.

Bounded everywhere, so a broken teacher fails the step with a reason instead of hanging it:
- a request answered 429 or 5xx, timed out or cut off is retried at most `maxRetries` times, after
  an exponential backoff with jitter (or the server's `Retry-After`, capped);
- any other 4xx (a bad key, a wrong model name, a refused request) is final at once;
- `check()` runs first: it lists the server's models with the key, so an unreachable host, a
  rejected key or a model the server does not have fails before a single row is sent.

The API key is sent as a bearer token and is in no message: errors name the host, the model and
the HTTP status, and quote the server's own message only after redaction of the key.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from tessera.api.finetunejob import TeacherSpec
from tessera.errors import TesseraError
from tessera.redact import redact

API_KEY_ENV = "TEACHER_API_KEY"  # noqa: S105 (the name of the variable, not a key)
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 30.0
# Server messages are quoted for the reason they give, not in full.
MESSAGE_LIMIT = 300


class TeacherError(TesseraError):
    """The teacher could not label: unreachable, refused the key or the model, or failed past its retries."""


class TeacherRefusedError(TeacherError):
    """A final answer (a bad key, a model it does not serve): every other row would get the same."""


@dataclass(frozen=True)
class Answer:
    text: str
    tokens_in: int
    tokens_out: int


@dataclass
class RequestCounts:
    """What was sent, for the manifest: requests (retries included), retries, and final failures."""

    sent: int = 0
    retries: int = 0
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


def teacher_host(url: str) -> str:
    """host[:port] of the endpoint: what a model card and a message may name."""
    return urlsplit(url).netloc


def backoff_seconds(attempt: int, retry_after: str | None, base: float = 0.5) -> float:
    """Seconds before retry number `attempt` (1-based): the server's Retry-After if it gives seconds,
    else base x 2^(attempt-1) with full jitter; never above MAX_BACKOFF_SECONDS."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), MAX_BACKOFF_SECONDS)
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    return random.uniform(0, min(base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))


class TeacherClient:
    """One teacher endpoint; use as `async with TeacherClient(spec, api_key) as teacher:`."""

    def __init__(self, spec: TeacherSpec, api_key: str | None, *, backoff_base: float = 0.5) -> None:
        self.spec = spec
        self.host = teacher_host(spec.url)
        self.counts = RequestCounts()
        self._api_key = api_key
        self._backoff_base = backoff_base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency)
        self._http = httpx.AsyncClient(base_url=spec.url.rstrip("/") + "/", headers=headers,
                                       timeout=httpx.Timeout(spec.timeout_seconds), limits=limits)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())[:MESSAGE_LIMIT]
        return redact(text.replace(self._api_key, "***") if self._api_key else text)

    def _server_message(self, response: httpx.Response) -> str:
        try:
            body = response.json()
            error = body.get("error", body) if isinstance(body, dict) else body
            message = error.get("message") or error.get("detail") if isinstance(error, dict) else error
        except ValueError:
            message = response.text
        return self._clean(str(message or response.reason_phrase))

    def _refusal(self, response: httpx.Response) -> TeacherRefusedError:
        where = f"teacher {self.spec.model!r} at {self.host}"
        if response.status_code in (401, 403):
            return TeacherRefusedError(f"{where} refused the API key (HTTP {response.status_code}); check the "
                                f"{API_KEY_ENV} in spec.dataset.teacher.credentialsSecret")
        if response.status_code == 404:
            return TeacherRefusedError(f"{where}: HTTP 404, {self._server_message(response)} "
                                "(check spec.dataset.teacher.url and .model)")
        return TeacherRefusedError(f"{where} refused the request (HTTP {response.status_code}): "
                            f"{self._server_message(response)}")

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """The response of the first attempt that is not retryable, or a TeacherError once retries are spent."""
        attempt = 0
        while True:
            self.counts.sent += 1
            retry_after = None
            try:
                response = await self._http.request(method, path, json=body)
                self.counts.count(str(response.status_code))
                if response.status_code not in RETRYABLE_STATUS:
                    return response
                retry_after = response.headers.get("retry-after")
                reason = f"HTTP {response.status_code}: {self._server_message(response)}"
            except httpx.TimeoutException:
                self.counts.count("timeout")
                reason = f"no answer within {self.spec.timeout_seconds:g}s"
            except httpx.TransportError as error:
                self.counts.count("unreachable")
                reason = f"cannot connect ({type(error).__name__})"
            attempt += 1
            if attempt > self.spec.max_retries:
                self.counts.failed += 1
                raise TeacherError(f"teacher {self.spec.model!r} at {self.host}: {reason}, after {attempt} "
                                   f"attempts (spec.dataset.teacher.maxRetries: {self.spec.max_retries})")
            self.counts.retries += 1
            await asyncio.sleep(backoff_seconds(attempt, retry_after, self._backoff_base))

    async def check(self) -> None:
        """Fail early and clearly: the server answers, accepts the key, and serves `spec.model`."""
        response = await self._send("GET", "models")
        if response.status_code != 200:
            raise self._refusal(response)
        try:
            served = [entry["id"] for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise TeacherRefusedError(f"teacher at {self.host}: GET models did not answer an OpenAI model list; "
                               "is spec.dataset.teacher.url the API's base URL (ending in /v1)?") from None
        if self.spec.model not in served:
            listed = ", ".join(sorted(served)[:20]) or "none"
            raise TeacherRefusedError(f"teacher at {self.host} does not serve model {self.spec.model!r} "
                               f"(spec.dataset.teacher.model); it serves: {self._clean(listed)}")

    async def ask(self, prompt: str) -> Answer:
        """One answer of the teacher to `prompt`, as the user turn of a chat."""
        body = {
            "model": self.spec.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
        }
        response = await self._send("POST", "chat/completions", body)
        if response.status_code != 200:
            raise self._refusal(response)
        try:
            payload = response.json()
            text = payload["choices"][0]["message"]["content"] or ""
            usage = payload.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            self.counts.failed += 1
            raise TeacherError(f"teacher {self.spec.model!r} at {self.host} answered HTTP 200 without a chat "
                               "completion (no choices[0].message.content)") from None
        return Answer(str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
