"""The one redaction rule for everything a person or a log can read: errors, log lines, Events, statuses.

Three things never leave the process: the userinfo of a URL (`s3://user:password@host` → `s3://***@host`),
the value of any secret-looking environment variable (AWS keys, tokens, passwords), and, by the
callers' own rule, file content (errors name a file and a line, never what the line holds).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")
_SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE|SESSION", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter values ("0", "1", "yes") would blank out ordinary words
MASK = "***"


def redact(text: object, env: Mapping[str, str] | None = None) -> str:
    """`text` with URL userinfo and secret environment values replaced by `***`."""
    result = _USERINFO.sub(rf"\g<scheme>{MASK}@", str(text))
    environment = os.environ if env is None else env
    for name, value in environment.items():
        if len(value) >= _MIN_SECRET_LENGTH and _SECRET_NAME.search(name) and value in result:
            result = result.replace(value, MASK)
    return result


class RedactingFilter(logging.Filter):
    """Applies `redact` to the formatted message (and traceback) of every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put the filter on `logger` (default: the root) and its handlers: the logger's own filter sees
    the records created on it, its handlers' filters also those propagated from below."""
    target = logger or logging.getLogger()
    for filterer in (target, *target.handlers):
        if not any(isinstance(f, RedactingFilter) for f in filterer.filters):
            filterer.addFilter(RedactingFilter())
