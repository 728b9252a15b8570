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


# The status of every code a boundary answers over HTTP (the server, the adapter agent): the same
# failure has the same code and the same status wherever it happens. A code not listed is a 400.
ERROR_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_path": 400,
    "path_not_allowed": 403,
    "adapter_not_found": 404,
    "adapter_corrupt": 400,
    "adapter_unsupported": 400,
    "adapter_incompatible": 400,
    "base_model_mismatch": 400,
    "vocab_mismatch": 400,
    "target_modules_missing": 400,
    "target_modules_unsupported": 400,
    "rank_too_high": 400,
    "sha256_mismatch": 400,
    "model_not_found": 404,
    "lora_not_found": 404,
    "adapter_unavailable": 503,  # a served adapter could not be brought back after an eviction
    # The store answered with an error (a gateway's failure), or did not answer within the retries.
    "store_error": 502,
    "store_unavailable": 503,
    # The runtime beside the adapter agent: refused the adapter, failed, could not read it, is down.
    "runtime_refused": 400,
    "runtime_error": 502,
    "runtime_cannot_read": 502,
    "runtime_unavailable": 503,
    "volume_error": 507,  # the agent's shared adapters volume is full or unwritable
}


class CodedError(TesseraError):
    """An error that leaves the process over HTTP: a stable `code` and its `status` (from `ERROR_STATUS`
    unless the caller's protocol fixes another). Redacted once, by `TesseraError`."""

    def __init__(self, message: object, *, code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = str(self)
        self.code = code
        self.status = ERROR_STATUS.get(code, 400) if status is None else status


class AdapterFormatError(CodedError):
    """An adapter directory that is not a PEFT LoRA adapter some runtime can serve, or may not be read."""
