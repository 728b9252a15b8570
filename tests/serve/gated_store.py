"""An S3 endpoint in front of the session's moto server whose reads of chosen keys wait for the test.

It stands in for a slow store (MinIO under load, a far region): the test closes the gate on one
object, learns when the server's fetch of it is held (`held`), does what it wants meanwhile, and
opens the gate. Everything else passes through unchanged.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class GatedStore(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = urlsplit(upstream)
        self.gated: str | None = None  # a fragment of the path whose GETs wait
        self.gate = threading.Event()
        self.held = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close_on(self, fragment: str) -> None:
        self.gate.clear()
        self.held.clear()
        self.gated = fragment

    def open(self) -> None:
        self.gated = None
        self.gate.set()


class _Forward(BaseHTTPRequestHandler):
    server: GatedStore
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        store = self.server
        if self.command == "GET" and store.gated and store.gated in self.path:
            store.held.set()
            store.gate.wait(60)  # a bound on a broken test, not a synchronisation
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(store.upstream.hostname, store.upstream.port, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(name, value)
        # A HEAD's length is the object's, as the store sent it.
        self.send_header("content-length", response.getheader("content-length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward
