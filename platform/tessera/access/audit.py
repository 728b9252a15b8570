"""The audit trail: one JSON line per inference request on the `tessera.audit` logger, and the
per-subject token counters for chargeback.

A line carries who asked (subject, groups), what (namespace, adapter and version, base, route), the
outcome (status, decision, tokens in and out, latency) and a SHA-256 of the prompt: the prompt
itself only when `includeContent` is on. No token, key or header value is ever written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "tessera.audit"

try:  # Both runtimes ship prometheus_client (vLLM serves it at /metrics, as Tessera's server does).
    from prometheus_client import REGISTRY, Counter, Histogram
except ImportError:  # pragma: no cover - a runtime without it still gets the audit lines
    Counter = Histogram = None  # type: ignore[assignment,misc]


def _registered(kind: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return kind(name, *args, **kwargs)
    except ValueError:  # already registered by another copy of this module (tessera.access and tessera_access)
        return REGISTRY._names_to_collectors[name]  # noqa: SLF001 - the registry's only lookup by name


def _metrics() -> dict[str, Any]:
    if Counter is None:
        return {}
    return {
        "tokens": _registered(Counter, "tessera_tokens", "Tokens per subject and adapter, for chargeback.",
                              ["subject", "adapter", "direction"]),
        "requests": _registered(Counter, "tessera_access_requests",
                                "Inference requests by access decision and HTTP status.", ["decision", "status"]),
        "quota": _registered(Counter, "tessera_quota_rejections", "Requests refused with 429 by a quota.",
                             ["subject", "limit"]),
        "latency": _registered(Histogram, "tessera_access_request_duration_seconds",
                               "Time from request to the end of the answer, as the access middleware saw it.",
                               ["decision"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
    }


_METRICS: dict[str, Any] | None = None


def metrics() -> dict[str, Any]:
    """Registered once per process (the default registry refuses a second registration)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = _metrics()
    return _METRICS


def forget_adapter_usage(adapter: str) -> None:
    """Drop an unloaded adapter's token series: names come from callers, so series must not outlive what is
    served (Prometheus has the counts from its scrapes; `increase()` reads a removed series as ended)."""
    tokens = metrics().get("tokens")
    if tokens is not None:
        tokens.remove_by_labels({"adapter": adapter})


def prompt_digest(prompt: Any) -> str | None:
    """SHA-256 of the prompt as the request carried it (canonical JSON of the field), or None."""
    if prompt is None:
        return None
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, separators=(",", ":"))
    # surrogatepass: a lone surrogate (valid JSON, not UTF-8) is hashed too; the runtime then refuses it.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class AuditRecord:
    request_id: str
    route: str
    namespace: str
    subject: str | None = None
    groups: list[str] = field(default_factory=list)
    adapter: str | None = None
    version: str | None = None
    base: str | None = None
    status: int = 0
    decision: str = "allowed"  # allowed | unauthenticated | denied | rate_limited | unavailable | invalid
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    quota: str | None = None  # the limit that refused it: tokens | concurrency
    prompt_sha256: str | None = None
    prompt: Any = None  # only with includeContent

    def line(self) -> str:
        body = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                **asdict(self)}
        if body["prompt"] is None:
            del body["prompt"]
        return json.dumps(body, separators=(",", ":"), default=str)


def audit_logger(path: Path | None = None) -> logging.Logger:
    """The dedicated logger: stdout (the pod's log, collected with the rest) or a file; one line each."""
    logger = logging.getLogger(AUDIT_LOGGER)
    target = str(path) if path else "<stdout>"
    if getattr(logger, "tessera_target", None) != target:  # one destination per process: the last configured
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.tessera_target = target  # type: ignore[attr-defined]
        logger.setLevel(logging.INFO)
        logger.propagate = False  # never mixed into, nor formatted by, the server's own log
    return logger


def emit(logger: logging.Logger, record: AuditRecord) -> None:
    logger.info(record.line())
    found = metrics()
    if not found:
        return
    found["requests"].labels(record.decision, str(record.status)).inc()
    found["latency"].labels(record.decision).observe(record.latency_ms / 1000)
    if record.decision == "rate_limited":
        found["quota"].labels(record.subject or "", record.quota or "").inc()
    if record.subject and record.adapter:
        if record.tokens_in:
            found["tokens"].labels(record.subject, record.adapter, "in").inc(record.tokens_in)
        if record.tokens_out:
            found["tokens"].labels(record.subject, record.adapter, "out").inc(record.tokens_out)
