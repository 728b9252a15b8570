"""Hot-loading adapters into the predictor replicas of an InferenceService, through the adapter API
Tessera's server shares with vLLM: `GET /v1/models`, `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`.

Replicas are the InferenceService's Ready pods (label `serving.kserve.io/inferenceservice`),
reached at `podIP:port`, the port being the one the adapter agent's container declares (it brings
adapters from the store and loads them into vLLM or Tessera's server alike), else the serving
container's (a runtime without the agent), else the configured default.
Each pass asks every replica what it holds, so a replica that restarted and came back empty is
found and loaded again; failed loads are retried with exponential backoff.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from tessera.api import Adapter

SERVING_CONTAINER = "kserve-container"
# The sidecar that serves the adapter API on every predictor (tessera.agent); the operator calls it.
AGENT_CONTAINER = "adapter-agent"
# A load that takes longer is not waited for: the handler's worker is released and the next pass
# finds the adapter loaded (the agent finishes it) or loads it again. So no replica holds a worker long.
LOAD_TIMEOUT_SECONDS = 15.0
CONNECT_TIMEOUT_SECONDS = 3.0
MAX_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class Replica:
    name: str
    uid: str
    url: str


class AdapterApiError(Exception):
    """A replica refused or failed an adapter API call; the message is the server's own, `status` its
    HTTP status (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def replica_url(pod: dict[str, Any], default_port: int) -> str:
    containers = {c.get("name"): c for c in pod.get("spec", {}).get("containers") or []}
    serving = containers.get(AGENT_CONTAINER) or containers.get(SERVING_CONTAINER) or next(iter(containers.values()),
                                                                                          {})
    ports = serving.get("ports") or []
    port = ports[0].get("containerPort", default_port) if ports else default_port
    return f"http://{pod['status']['podIP']}:{port}"


def replicas_from_pods(pods: list[dict[str, Any]], default_port: int) -> list[Replica]:
    return sorted(
        (Replica(p["metadata"]["name"], p["metadata"].get("uid", ""), replica_url(p, default_port)) for p in pods),
        key=lambda r: r.name,
    )


def is_loaded(adapter: Adapter, card: dict[str, Any] | None) -> bool:
    """Whether a replica's model card shows this adapter, from this URI (and with this digest)."""
    if card is None:
        return False
    if card.get("root") not in (None, adapter.spec.uri):
        return False
    return adapter.spec.sha256 is None or card.get("sha256") in (None, adapter.spec.sha256)


def backoff_seconds(attempts: int) -> float:
    return min(2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}: {response.text[:300]}"
    error = body.get("error")
    text = error.get("message") if isinstance(error, dict) else body.get("message")
    return f"HTTP {response.status_code}: {text or response.text[:300]}"


class AdapterApi:
    """The adapter API of one kind of server (Tessera's or vLLM's), over HTTP."""

    def __init__(self, client: httpx.Client | None = None, timeout: float = LOAD_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS))

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, url, **kwargs)
        except httpx.HTTPError as error:
            raise AdapterApiError(f"{type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise AdapterApiError(_message(response), response.status_code)
        return response

    def cards(self, replica: Replica) -> dict[str, dict[str, Any]]:
        body = self._call("GET", f"{replica.url}/v1/models", timeout=min(self.timeout, 10.0)).json()
        return {card["id"]: card for card in body.get("data", []) if isinstance(card, dict) and "id" in card}

    def load(self, replica: Replica, adapter: Adapter) -> None:
        # load_inplace: a new version under the same name replaces the one served (vLLM refuses it otherwise).
        body = {"lora_name": adapter.metadata.name, "lora_path": adapter.spec.uri, "load_inplace": True}
        if adapter.spec.sha256:
            body["sha256"] = adapter.spec.sha256
        if adapter.spec.task:
            body["task"] = adapter.spec.task
        self._call("POST", f"{replica.url}/v1/load_lora_adapter", json=body)

    def unload(self, replica: Replica, name: str) -> None:
        try:
            self._call("POST", f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=self.timeout)
        except AdapterApiError as error:
            if error.status != 404:  # 404: not loaded there, nothing to undo
                raise


@dataclass
class Backoff:
    """Per-replica retry state, kept in the operator's memory for the adapter."""

    attempts: int = 0
    not_before: float = 0.0
    message: str = ""

    def failed(self, message: str, now: float | None = None) -> None:
        self.attempts += 1
        self.message = message
        self.not_before = (now if now is not None else time.monotonic()) + backoff_seconds(self.attempts)


def sync_replica(api: AdapterApi, replica: Replica, adapter: Adapter, backoff: Backoff,
                 now: float | None = None) -> dict[str, Any]:
    """Make one replica hold the adapter; returns its entry for `status.replicas`."""
    now = now if now is not None else time.monotonic()
    entry = {"name": replica.name, "url": replica.url}
    try:
        if is_loaded(adapter, api.cards(replica).get(adapter.metadata.name)):
            backoff.attempts = 0
            return {**entry, "state": "Loaded", "message": "", "attempts": 0}
    except AdapterApiError as error:
        return {**entry, "state": "Pending", "message": f"replica not answering: {error}", "attempts": backoff.attempts}
    if now < backoff.not_before:
        return {**entry, "state": "Failed", "message": backoff.message, "attempts": backoff.attempts}
    try:
        api.load(replica, adapter)
    except AdapterApiError as error:
        backoff.failed(str(error), now)
        return {**entry, "state": "Failed", "message": backoff.message, "attempts": backoff.attempts}
    backoff.attempts = 0
    return {**entry, "state": "Loaded", "message": "", "attempts": 0}


def adapter_phase(replicas: list[dict[str, Any]]) -> tuple[str, str]:
    """The Adapter's phase and message from its replicas' states."""
    if not replicas:
        return "Pending", "waiting for a ready replica of the InferenceService"
    states = [r["state"] for r in replicas]
    loaded = states.count("Loaded")
    if loaded == len(states):
        return "Ready", f"loaded on {loaded} replica(s)"
    if states.count("Failed") == len(states):
        return "Failed", replicas[0]["message"]
    return "Loading", f"loaded on {loaded} of {len(states)} replica(s)"
