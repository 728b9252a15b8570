"""Bounded retries with exponential backoff for transient store failures."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tessera.errors import StoreError

T = TypeVar("T")
RETRY_SECONDS_ENV = "TESSERA_STORE_RETRY_SECONDS"


@dataclass(frozen=True)
class RetryPolicy:
    """How long a store keeps retrying one operation before it gives up.

    The bound is `total_seconds` of waiting plus at most one request's timeout: an attempt
    is never cut short, but no new attempt starts once its backoff would pass the budget.
    """

    total_seconds: float = 30.0
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RetryPolicy:
        raw = env.get(RETRY_SECONDS_ENV)
        if raw is None:
            return cls()
        try:
            seconds = float(raw)
        except ValueError:
            raise StoreError(f"{RETRY_SECONDS_ENV}={raw!r} is not a number of seconds") from None
        if seconds < 0:
            raise StoreError(f"{RETRY_SECONDS_ENV} must not be negative, got {raw}")
        return cls(total_seconds=seconds)

    def backoffs(self) -> Iterator[float]:
        """Delays before each retry: doubling from `initial_backoff`, capped, with jitter in [½, 1]."""
        delay = self.initial_backoff
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.max_backoff)


class RetriesExhausted(Exception):
    """Raised by `call_with_retry` with the last transient error, the attempts and seconds spent."""

    def __init__(self, last_error: BaseException, attempts: int, elapsed: float) -> None:
        super().__init__(str(last_error))
        self.last_error = last_error
        self.attempts = attempts
        self.elapsed = elapsed


def call_with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation`; retry transient errors until the budget is spent, then `RetriesExhausted`.

    Non-transient errors propagate at once: retrying a missing object or a refused
    credential only delays the message a person needs.
    """
    start = clock()
    attempts = 0
    for delay in policy.backoffs():
        attempts += 1
        try:
            return operation()
        except Exception as error:
            if not is_transient(error):
                raise
            elapsed = clock() - start
            if elapsed + delay > policy.total_seconds:
                raise RetriesExhausted(error, attempts, elapsed) from error
            sleep(delay)
    raise AssertionError("backoffs() is infinite")  # pragma: no cover
