"""Progress for Kubeflow Trainer v2 (KEP-2779): `kubectl get trainjob` shows how far training is.

Under Trainer v2 (>= 2.2, feature gate `TrainJobStatus`) the controller gives every trainer
container three variables (`pkg/runtime/framework/plugins/trainjobstatus` upstream):

- `KUBEFLOW_TRAINER_SERVER_URL`: `https://…/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status`;
- `KUBEFLOW_TRAINER_SERVER_CA_CERT`: the path of the CA that signed that server's certificate;
- `KUBEFLOW_TRAINER_SERVER_TOKEN`: the path of a projected ServiceAccount token whose audience
  names the TrainJob. It rotates, so it is read again for every request.

Rank 0 POSTs `{"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics
[{name, value}], lastUpdatedTime}}` with `Authorization: Bearer <token>`; the controller writes it
to the TrainJob's `status.trainerStatus`. Values of metrics are strings, percentages and seconds
integers (int32, as the upstream API types them).

Reporting never stops training: a refused or failed request is logged (never with the token) and
the next one waits longer (5 s, doubling to 5 min), as the KEP asks of runtimes. At most one
request per 5 s (the upstream SDK's rate), except the last one, which always goes.
The progress file in the store, which Tessera's operator reads, is written whatever happens here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"  # noqa: S105 (the name of a variable holding a path)
MIN_INTERVAL_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0
TIMEOUT_SECONDS = 5.0
INT32_MAX = 2**31 - 1

# progress.json field → KEP-2779 metric name (the KEP's examples: loss, currentEpoch, totalEpochs).
_METRICS = {"loss": "loss", "epoch": "currentEpoch", "step": "currentStep", "totalSteps": "totalSteps",
            "tokensPerSecond": "tokensPerSecond", "trainedTokens": "trainedTokens"}


def trainer_status(progress: Mapping[str, Any]) -> dict[str, Any]:
    """The KEP-2779 request body for one progress document of the shared contract (progress.json)."""
    status: dict[str, Any] = {}
    if isinstance(progress.get("percent"), int | float):
        status["progressPercentage"] = int(min(max(math.floor(progress["percent"]), 0), 100))
    eta = progress.get("etaSeconds")
    if isinstance(eta, int | float) and math.isfinite(eta):
        status["estimatedRemainingSeconds"] = int(min(max(round(eta), 0), INT32_MAX))
    metrics = [{"name": name, "value": _metric_value(progress[key])}
               for key, name in _METRICS.items() if _is_number(progress.get(key))]
    if metrics:
        status["metrics"] = metrics
    status["lastUpdatedTime"] = progress.get("updatedAt") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"trainerStatus": status}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric_value(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class TrainerStatusReporter:
    """Posts progress to the Trainer v2 status server of the TrainJob this pod belongs to."""

    def __init__(self, url: str, token_file: Path, ca_file: Path | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.token_file, self.clock = url, token_file, clock
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.next_allowed = 0.0
        self.backoff = MIN_INTERVAL_SECONDS
        self.sent = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> TrainerStatusReporter | None:
        """A reporter when the pod runs under Trainer v2 with progress reporting on; else None."""
        url, token = environ.get(URL_ENV), environ.get(TOKEN_ENV)
        if not url or not token:
            return None
        if not url.startswith("https://"):
            # The bearer token must never travel in the clear (nor to a file: URL).
            log.warning("not reporting progress to Kubeflow Trainer: %s is not an https URL", URL_ENV)
            return None
        ca = environ.get(CA_ENV)
        try:
            return cls(url, Path(token), Path(ca) if ca else None)
        except (OSError, ssl.SSLError) as error:
            log.warning("not reporting progress to Kubeflow Trainer: cannot read its CA %s (%s)", ca,
                        type(error).__name__)
            return None

    def report(self, progress: Mapping[str, Any], *, final: bool = False) -> bool:
        """Send `progress` unless it is too soon after the last request; True when it was accepted."""
        now = self.clock()
        if not final and now < self.next_allowed:
            return False
        try:
            token = self.token_file.read_text().strip()
            body = json.dumps(trainer_status(progress)).encode()
            # https only: from_environ refuses any other scheme.
            request = urllib.request.Request(self.url, data=body, method="POST", headers={  # noqa: S310
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS,  # noqa: S310
                                        context=self.context) as response:
                response.read()
        except urllib.error.HTTPError as error:
            self._failed(now, f"HTTP {error.code} {_status_message(error)}")
            return False
        except (OSError, ValueError) as error:  # URLError, timeouts, TLS, a missing token file
            self._failed(now, f"{type(error).__name__}: {getattr(error, 'reason', '') or error}")
            return False
        self.sent += 1
        self.backoff = MIN_INTERVAL_SECONDS
        self.next_allowed = now + MIN_INTERVAL_SECONDS
        return True

    def _failed(self, now: float, why: str) -> None:
        log.warning("Kubeflow Trainer did not take the progress report (%s); training goes on, next try in "
                    "%.0fs", why, self.backoff)
        self.next_allowed = now + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)


def _status_message(error: urllib.error.HTTPError) -> str:
    """The server's own words (a Kubernetes Status), short; never the request, which holds the token."""
    try:
        return str(json.loads(error.read(4096) or b"{}").get("message", ""))[:200]
    except (ValueError, OSError, AttributeError):
        return ""
