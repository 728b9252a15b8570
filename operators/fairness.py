"""One tenant never holds the operator: a cap on the operations running at once per namespace.

kopf runs synchronous handlers on a pool of `max_workers` threads shared by every object. Without a
cap, one namespace with many slow objects (adapters whose replicas hang) fills the pool and every
other namespace waits. A handler first takes a slot of its namespace; when its namespace already
runs `limit` operations it does not wait for one (waiting would hold a worker) but asks kopf to
retry later (`kopf.TemporaryError`, with a backoff that grows with kopf's retry count). So one
namespace holds at most `limit` workers, each for at most the longest call a handler makes (the
adapter API's timeout), and another namespace's object is picked up while fewer than
`max_workers / limit` namespaces flood at once.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator

import kopf

MAX_RETRY_DELAY = 30.0


def retry_delay(retry: int) -> float:
    """Exponential backoff with jitter (so a flood's retries do not come back in step)."""
    return min(2.0 ** retry, MAX_RETRY_DELAY) * random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not a secret)


class NamespaceSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}

    def running(self, namespace: str) -> int:
        with self._lock:
            return self._running.get(namespace, 0)

    @contextlib.contextmanager
    def slot(self, namespace: str, retry: int = 0) -> Iterator[None]:
        """Run the block in one of `namespace`'s slots, or raise kopf.TemporaryError when none is free."""
        with self._lock:
            taken = self._running.get(namespace, 0)
            if taken < self.limit:
                self._running[namespace] = taken + 1
        if taken >= self.limit:
            raise kopf.TemporaryError(f"namespace {namespace} already runs {self.limit} operations (the "
                                      "installation's per-namespace limit); retrying", delay=retry_delay(retry))
        try:
            yield
        finally:
            with self._lock:
                self._running[namespace] -= 1
