"""A tenant flooding the operator: predictor replicas whose adapter load never answers.

Used by tests/operator/test_tenancy.py and benchmarks/tenant_flood.py. `HangingReplica` stands in for
an adapter agent (or vLLM) that lists its models at once but holds every load request open;
`serve_on_hanging_replica` puts one Ready predictor pod of an InferenceService on it in the emulator,
so the operator finds a replica and calls its load, and `flooding_adapters` aims adapters there.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.operator.harness import SimulatedCluster

ISVC_NAME = "tessera-flood"


class HangingReplica:
    def __init__(self, hang_seconds: float = 300.0) -> None:
        self.released = threading.Event()
        self.loads = 0
        self.open_loads = 0
        self.peak_open_loads = 0
        self._lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _held(self, seconds: float) -> bool:
                """Hold the request until released (True) or until the caller hangs up (False), so
                `open_loads` counts the calls a caller is still waiting on."""
                deadline = time.monotonic() + seconds
                while not replica.released.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                return True

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._answer({"object": "list", "data": []})

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with replica._lock:
                    replica.loads += 1
                    replica.open_loads += 1
                    replica.peak_open_loads = max(replica.peak_open_loads, replica.open_loads)
                try:
                    if self._held(hang_seconds):
                        self._answer({"message": "loaded"})
                except OSError:
                    pass
                finally:
                    with replica._lock:
                        replica.open_loads -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def serve_on_hanging_replica(cluster: SimulatedCluster, namespace: str, replica: HangingReplica) -> None:
    """The InferenceService `ISVC_NAME` and one Ready predictor pod of it, reached at the replica."""
    cluster.create({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                    "metadata": {"name": ISVC_NAME, "namespace": namespace},
                    "spec": {"predictor": {"model": {"modelFormat": {"name": "tessera"}, "storageUri": "s3://x/m"}}}})
    cluster.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": f"{ISVC_NAME}-predictor-0", "namespace": namespace,
                                 "labels": {"serving.kserve.io/inferenceservice": ISVC_NAME}},
                    "spec": {"containers": [{"name": "adapter-agent", "image": "tessera-operator",
                                             "ports": [{"containerPort": replica.port}]}]},
                    "status": {"phase": "Running", "podIP": "127.0.0.1",
                               "conditions": [{"type": "Ready", "status": "True"}]}})


def flooding_adapters(store: Path, namespace: str, count: int) -> list[dict[str, Any]]:
    """`count` valid Adapters of `namespace` served by the hanging InferenceService."""
    return [{"apiVersion": "tessera.dev/v1alpha1", "kind": "Adapter",
             "metadata": {"name": f"flood-{i}", "namespace": namespace},
             "spec": {"baseModel": {"uri": str(store / "models" / "flood")},
                      "uri": str(store / "adapters" / namespace / f"flood-{i}" / "v1"),
                      "serving": {"createInferenceService": False}}} for i in range(count)]
