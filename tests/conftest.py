"""Fixtures shared by the whole suite.

`s3_server` is a real S3 server, moto's server mode in its own process on 127.0.0.1; it stands in
for the MinIO a cluster runs. Tests talk to it over HTTP with the `minio` SDK, as the platform does.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import stop

S3_ACCESS_KEY = "tessera-test-access"
S3_SECRET_KEY = "tessera-test-secret-0123456789"  # noqa: S105 - a test server's key
S3_REGION = "us-east-1"


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers a test starts)."""
    return _unused_port()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL (`http://127.0.0.1:PORT`) of a moto S3 server that lives for the session."""
    port = _unused_port()
    log_path = Path(tmp_path_factory.mktemp("moto")) / "moto.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()  # noqa: S310 - loopback
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto S3 server did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield endpoint
    finally:
        stop(server, timeout=10)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the store at `s3_server` the way a KServe-style Secret does; yields the endpoint URL.

    Sets S3_ENDPOINT (host:port), S3_USE_HTTPS=0, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION, and a short store retry budget so a broken test fails fast.
    """
    monkeypatch.setenv("S3_ENDPOINT", s3_server.removeprefix("http://"))
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("TESSERA_STORE_RETRY_SECONDS", "5")
    return s3_server


@pytest.fixture
def s3_bucket() -> str:
    """A bucket name no other test uses (the store creates it on the first write)."""
    return f"test-{uuid.uuid4().hex[:16]}"
