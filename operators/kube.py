"""A thin shell over the `kubernetes` client: create-or-read, get, patch, list pods, read Secrets.

Every API failure comes out as one of three exceptions, so handlers decide in one place what is
retried (`Transient`: 5xx, 429, timeouts, a lost connection) and what ends the job (`Rejected`:
the API server refused the object, e.g. 422 Invalid or 403 Forbidden).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from tessera.api import API_VERSION

# apiVersion/kind → plural, for the kinds the operator reads or writes.
PLURALS = {
    ("argoproj.io/v1alpha1", "Workflow"): "workflows",
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjobs",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjobs",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservices",
    (API_VERSION, "Adapter"): "adapters",
    (API_VERSION, "FineTuneJob"): "finetunejobs",
}
TRANSIENT_STATUSES = {0, 408, 429, 500, 502, 503, 504}


class KubeError(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Transient(KubeError):
    """Worth retrying: the API server was unavailable, overloaded, or the call timed out."""


class Rejected(KubeError):
    """The API server refused the request for good (bad object, no permission)."""


def _error(action: str, what: str, error: Exception) -> KubeError:
    if isinstance(error, ApiException):
        reason = error.reason or ""
        try:
            reason = json.loads(error.body or "{}").get("message") or reason
        except ValueError:
            pass
        cls = Transient if error.status in TRANSIENT_STATUSES else Rejected
        return cls(f"{action} {what}: HTTP {error.status}: {reason}", error.status)
    return Transient(f"{action} {what}: {type(error).__name__}: {error}")


def load_config() -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: the kubeconfig (`KUBECONFIG` or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    @staticmethod
    def _gvp(api_version: str, kind: str) -> tuple[str, str, str]:
        group, _, version = api_version.rpartition("/")
        return group, version, PLURALS[(api_version, kind)]

    def _call(self, action: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as error:
            raise _error(action, what, error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _error(action, what, error) from None

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `obj`; if one of that name exists, read it instead. Returns (object, created)."""
        meta = obj["metadata"]
        what = f"{obj['kind']} {meta['namespace']}/{meta['name']}"
        try:
            if obj["kind"] == "ConfigMap":
                created = self.core.create_namespaced_config_map(meta["namespace"], obj)
                return self.core.api_client.sanitize_for_serialization(created), True
            group, version, plural = self._gvp(obj["apiVersion"], obj["kind"])
            return self.custom.create_namespaced_custom_object(group, version, meta["namespace"], plural, obj), True
        except ApiException as error:
            if error.status != 409:
                raise _error("creating", what, error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _error("creating", what, error) from None
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted between the conflict and the read: the next attempt creates it
            raise Transient(f"creating {what}: it exists and vanished again")
        return existing, False

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "ConfigMap":
                found = self.core.read_namespaced_config_map(name, namespace)
                return self.core.api_client.sanitize_for_serialization(found)
            group, version, plural = self._gvp(api_version, kind)
            return self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise _error("reading", f"{kind} {namespace}/{name}", error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _error("reading", f"{kind} {namespace}/{name}", error) from None

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict:
        group, version, plural = self._gvp(api_version, kind)
        return self._call("patching", f"{kind} {namespace}/{name}", self.custom.patch_namespaced_custom_object,
                          group, version, namespace, plural, name, patch)

    def count(self, api_version: str, kind: str, namespace: str, selector: str) -> int:
        """How many objects of a custom kind in `namespace` match the label `selector`."""
        group, version, plural = self._gvp(api_version, kind)
        found = self._call("listing", f"{plural} {selector} in {namespace}", self.custom.list_namespaced_custom_object,
                           group, version, namespace, plural, label_selector=selector)
        return len(found.get("items") or [])

    def ready_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Running pods matching `selector` whose Ready condition is True."""
        # Raw JSON: the client's models refuse pods whose optional fields they consider required.
        found = self._call("listing", f"pods {selector} in {namespace}", self.core.list_namespaced_pod,
                           namespace, label_selector=selector, _preload_content=False)
        pods = json.loads(found.data).get("items", [])
        return [p for p in pods if _ready(p) and not p["metadata"].get("deletionTimestamp")]

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """The decoded data of a Secret. Its values never go to a log, an Event or a status."""
        secret = self._call("reading", f"Secret {namespace}/{name}", self.core.read_namespaced_secret, name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
