"""Connection hygiene for uvicorn: a deadline to send a whole request, and a cap on open connections.

uvicorn bounds the idle time between two requests (`timeout_keep_alive`) and nothing else: a client
that connects and never sends, sends half its headers, or declares a body it never sends holds a
connection (a file descriptor) for as long as it likes, and enough of them lock every client out.
`bounded_protocol` returns uvicorn's own HTTP protocol with two more rules, as nginx's
`client_header_timeout`/`client_body_timeout` and `worker_connections` give them:
- a request must arrive whole (headers and body) within `read_timeout` of the connection being made
  or the request begun; else 408 Request Timeout (or a plain close if not a byte came) and the
  connection is closed;
- beyond `max_connections` open connections, a new one is answered 503 and closed at once.
"""

from __future__ import annotations

import json
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# Descriptors the process keeps for itself (model files, the store, logs) below its limit.
RESERVED_DESCRIPTORS = 64


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered to what the process's file descriptor limit can hold."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - RESERVED_DESCRIPTORS >= max_connections:
        return max_connections
    cap = max(1, soft - RESERVED_DESCRIPTORS)
    log.info("at most %d connections: the process may open %d files", cap, soft)
    return cap


def bounded_protocol(read_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a whole-request read deadline and a connection cap."""

    class BoundedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._read_deadline = None
            self._received = False  # a byte of the current request came

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d open, at most %d", len(self.connections) - 1, max_connections)
                transport.write(_raw_response(503, "Service Unavailable", "too many open connections; retry later",
                                              "too_many_connections"))
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._received = True
            if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # a new request on a kept-alive connection: its own deadline
            super().data_received(data)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._received = False
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _timed_out(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and self.cycle.response_started and self.cycle.more_body:
                # Answered before its body came (e.g. 413), and the body is still coming: only close.
                self.transport.close()
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the route waiting for the body sees the client gone
                self.cycle.message_event.set()
            if self._received:
                self.transport.write(_raw_response(
                    408, "Request Timeout", f"the request did not arrive whole within {read_timeout:g} s",
                    "request_timeout"))
            self.transport.close()

    return BoundedHttpProtocol
