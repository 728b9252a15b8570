"""Quotas per subject and per group: tokens per minute and requests in flight.

A request is admitted when its subject's limit and every limit of its groups have room: a token
bucket that is not in debt, and a free slot. Tokens are charged when the answer is done (in and out,
as the runtime counted them), so a request may take the bucket into debt; the next one waits until
the debt is refilled, and `Retry-After` says how long. A group's limit is shared by its members.

The file (a ConfigMap the chart renders from values):

    {"default": {"tokensPerMinute": 0, "concurrentRequests": 0},
     "subjects": {"system:serviceaccount:batch:loader": {"tokensPerMinute": 20000, "concurrentRequests": 4}},
     "groups": {"trading-desk": {"tokensPerMinute": 100000}}}

0 or absent: no limit. `default` applies to each subject that has no entry of its own.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .identity import Identity


class QuotaFileError(ValueError):
    pass


@dataclass(frozen=True)
class Limit:
    tokens_per_minute: int = 0
    concurrent_requests: int = 0

    @classmethod
    def of(cls, entry: Any, where: str) -> Limit:
        if not isinstance(entry, dict):
            raise QuotaFileError(f"{where}: expected an object with tokensPerMinute and/or concurrentRequests")
        values = {}
        for key in ("tokensPerMinute", "concurrentRequests"):
            value = entry.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise QuotaFileError(f"{where}.{key}: expected a whole number >= 0")
            values[key] = value
        return cls(values["tokensPerMinute"], values["concurrentRequests"])

    @property
    def unlimited(self) -> bool:
        return not self.tokens_per_minute and not self.concurrent_requests


@dataclass(frozen=True)
class QuotaPolicy:
    default: Limit = Limit()
    subjects: dict[str, Limit] | None = None
    groups: dict[str, Limit] | None = None

    @classmethod
    def load(cls, path: Path) -> QuotaPolicy:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise QuotaFileError(f"quota file {path}: cannot be read as JSON ({type(error).__name__})") from None
        return cls.parse(document, str(path))

    @classmethod
    def parse(cls, document: Any, where: str = "quotas") -> QuotaPolicy:
        if not isinstance(document, dict):
            raise QuotaFileError(f"{where}: expected an object with default, subjects, groups")
        sections = {}
        for section in ("subjects", "groups"):
            entries = document.get(section)
            entries = {} if entries is None else entries
            if not isinstance(entries, dict):
                raise QuotaFileError(f"{where}.{section}: expected an object of name -> limit")
            sections[section] = {name: Limit.of(entry, f"{where}.{section}.{name}") for name, entry in entries.items()}
        return cls(Limit.of(document.get("default") or {}, f"{where}.default"), sections["subjects"],
                   sections["groups"])

    def limits_for(self, identity: Identity) -> list[tuple[str, Limit]]:
        """The (key, limit) pairs a request of `identity` must fit, unlimited ones left out."""
        subject_limit = (self.subjects or {}).get(identity.subject, self.default)
        found = [(f"subject:{identity.subject}", subject_limit)]
        found += [(f"group:{group}", (self.groups or {})[group]) for group in identity.groups
                  if group in (self.groups or {})]
        return [(key, limit) for key, limit in found if not limit.unlimited]


@dataclass
class _Account:
    level: float
    updated: float
    in_flight: int = 0


@dataclass(frozen=True)
class Admission:
    """An admitted request's hold on its accounts; `release` gives the slots back and charges tokens."""

    keys: tuple[tuple[str, Limit], ...]


class QuotaExceeded(Exception):
    def __init__(self, retry_after: int, limit: str) -> None:
        super().__init__(limit)
        self.retry_after = retry_after
        self.limit = limit  # "tokens" or "concurrency": which limit refused, for the audit line


class QuotaLedger:
    """The accounts in memory, per replica (each replica enforces its share; see docs/install.md).

    Accounts of subjects with no limit are never made, so the ledger grows with the configured
    subjects and groups only, plus `default`-limited subjects that called (bounded by `max_accounts`,
    idle full ones dropped first)."""

    def __init__(self, policy: QuotaPolicy, clock: Any = time.monotonic, max_accounts: int = 10000) -> None:
        self.policy, self.clock, self.max_accounts = policy, clock, max_accounts
        self.accounts: dict[str, _Account] = {}

    def _account(self, key: str, limit: Limit, now: float) -> _Account:
        account = self.accounts.get(key)
        if account is None:
            if len(self.accounts) >= self.max_accounts:
                self._drop_idle(now)
            account = self.accounts[key] = _Account(float(limit.tokens_per_minute), now)
        elif limit.tokens_per_minute:
            refill = (now - account.updated) * limit.tokens_per_minute / 60.0
            account.level = min(float(limit.tokens_per_minute), account.level + refill)
        account.updated = now
        return account

    def _drop_idle(self, now: float) -> None:
        for key in [k for k, a in self.accounts.items() if a.in_flight == 0 and a.level >= 0]:
            del self.accounts[key]

    def admit(self, identity: Identity) -> Admission:
        now = self.clock()
        limits = self.policy.limits_for(identity)
        waits: list[tuple[float, str]] = []
        for key, limit in limits:
            account = self._account(key, limit, now)
            if limit.concurrent_requests and account.in_flight >= limit.concurrent_requests:
                waits.append((1.0, "concurrency"))
            if limit.tokens_per_minute and account.level <= 0:
                waits.append(((1 - account.level) * 60.0 / limit.tokens_per_minute, "tokens"))
        if waits:
            seconds, which = max(waits)
            raise QuotaExceeded(max(1, math.ceil(seconds)), which)
        for key, _ in limits:
            self.accounts[key].in_flight += 1
        return Admission(tuple(limits))

    def release(self, admission: Admission, tokens: int) -> None:
        now = self.clock()
        for key, limit in admission.keys:
            account = self._account(key, limit, now)
            account.in_flight = max(0, account.in_flight - 1)
            if limit.tokens_per_minute:
                account.level -= tokens
