"""Errors a user can act on. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations

from tessera.redact import redact


class TesseraError(Exception):
    """Base of every error meant for a person: its message says what went wrong and what to do."""

    exit_code = 1

    def __init__(self, message: object = "") -> None:
        # Messages quote URIs and library errors: the one redaction rule applies before anyone reads them.
        super().__init__(redact(message))


class InvalidSpecError(TesseraError):
    """A FineTuneJob or Adapter breaks the API's rules; `problems` holds every `path: rule` line."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = [redact(p) for p in problems]
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid spec:\n" + "\n".join(f"  - {p}" for p in self.problems))


class StoreError(TesseraError):
    """The artifact store refused or failed an operation (never carries a credential)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached within the retry budget: transient, worth retrying later."""


class ObjectNotFoundError(StoreError):
    """The named object or prefix does not exist in the store."""


class DatasetError(TesseraError):
    """The dataset cannot be used as it is: missing, unreadable, or with rows that break the rules."""
