"""S3-only behaviour: multipart streaming, retries, failure messages, bucket handling, layout.

The S3 server is moto's server mode on 127.0.0.1, standing in for MinIO. Where a test needs
an S3 endpoint that fails, a small HTTP proxy in front of moto injects 5xx answers, a closed
port stands in for a store that is down, and a socket that never answers for a hung one.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from minio import Minio
from pydantic import SecretStr
from tessera.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from tessera.store import COMPLETE_MARKER, RetryPolicy, S3Config, S3Store
from tessera.store.keys import sha256_file
from tessera.store.retry import RetriesExhausted, call_with_retry

MiB = 1024 * 1024
ACCESS_KEY = "AKIAEXAMPLEACCESSKEY"
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # noqa: S105 - AWS docs example key


def raw_client(endpoint: str) -> Minio:
    """The plain `minio` client a user would use, straight to the server."""
    return Minio(endpoint.removeprefix("http://"), os.environ["AWS_ACCESS_KEY_ID"],
                 os.environ["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")


def config_for(endpoint: str) -> S3Config:
    return S3Config(endpoint=endpoint, secure=False, region="us-east-1",
                    access_key=SecretStr(ACCESS_KEY), secret_key=SecretStr(SECRET_KEY))


def test_64_mib_file_goes_up_in_parts_and_comes_back_intact(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "adapter_model.safetensors"
    with source.open("wb") as out:  # generated a chunk at a time, never whole in memory
        for _ in range(64):
            out.write(os.urandom(MiB))
    expected = sha256_file(source)
    store = S3Store(s3_bucket, part_size=8 * MiB, parallel_uploads=2)

    tracemalloc.start()
    try:
        uploaded = store.put_file(source, "models/big/weights.bin")
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        store.get_file("models/big/weights.bin", tmp_path / "back.bin")
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert uploaded == expected
    assert sha256_file(tmp_path / "back.bin") == expected
    stat = raw_client(s3_env).stat_object(s3_bucket, "models/big/weights.bin")
    assert stat.size == 64 * MiB
    assert stat.etag.endswith("-8"), stat.etag  # a multipart ETag: 8 parts of 8 MiB
    # Bounded by a few parts in flight (parallel uploads + the one being read), not the file.
    assert upload_peak < 40 * MiB, upload_peak
    assert download_peak < 8 * MiB, download_peak


def test_unreachable_store_fails_fast_and_names_no_credential(free_port: int) -> None:
    store = S3Store("tessera", config_for(f"127.0.0.1:{free_port}"),
                    RetryPolicy(total_seconds=1.0, initial_backoff=0.05))
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as failure:
        store.get_bytes("models/llama/config.json")
    elapsed = time.monotonic() - start

    message = str(failure.value)
    assert f"127.0.0.1:{free_port}" in message
    assert "s3://tessera/models/llama/config.json" in message
    attempts = int(message.split(" attempts")[0].rsplit(" ", 1)[-1])
    assert attempts >= 3  # retried with backoff, not given up at once
    # It stopped: no attempt starts once its backoff (jittered to between half and all of its
    # nominal delay) would pass the 1 s budget, so how soon it stops varies; that it stops does not.
    assert elapsed < 30
    assert SECRET_KEY not in message and ACCESS_KEY not in message

    with pytest.raises(StoreUnavailableError) as write_failure:
        store.put_bytes("jobs/default/a/logs/progress.json", b"{}")
    assert SECRET_KEY not in str(write_failure.value)


def test_a_hung_store_times_out_within_the_budget() -> None:
    with socket.socket() as black_hole:  # accepts connections (backlog), never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        endpoint = f"127.0.0.1:{black_hole.getsockname()[1]}"
        store = S3Store("tessera", config_for(endpoint),
                        RetryPolicy(total_seconds=0.5, initial_backoff=0.05, read_timeout=0.3))
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="ReadTimeoutError"):
            store.get_bytes("models/llama/config.json")
        assert time.monotonic() - start < 30


class FlakyS3Proxy:
    """Forwards to the S3 server, but answers chosen requests with a 5xx as a struggling MinIO would."""

    FAILURES = (  # (status, content type, body): XML S3 error, an HTML gateway page, a bare 503
        (503, "application/xml", b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                                 b"<Message>Please reduce your request rate.</Message></Error>"),
        (502, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
        (503, "text/plain", b""),
    )

    def __init__(self, upstream: str, fail_requests: set[int] | None) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fail_requests = fail_requests  # 1-based request numbers; None = every request
        self.requests = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                proxy.forward(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def forward(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        with self.lock:
            self.requests += 1
            fail = self.fail_requests is None or self.requests in self.fail_requests
            if fail:
                status, content_type, payload = self.FAILURES[self.failed % len(self.FAILURES)]
                self.failed += 1
        if fail:
            request.send_response(status)
            request.send_header("Content-Type", content_type)
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        upstream.request(request.command, request.path, body=body, headers=dict(request.headers.items()))
        response = upstream.getresponse()
        data = response.read()
        request.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                request.send_header(name, value)
        content_length = response.getheader("Content-Length") if request.command == "HEAD" else len(data)
        request.send_header("Content-Length", str(content_length or 0))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
        upstream.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_proxy(s3_env: str) -> Iterator[type[FlakyS3Proxy]]:
    proxies: list[FlakyS3Proxy] = []

    def make(fail_requests: set[int] | None) -> FlakyS3Proxy:
        proxies.append(FlakyS3Proxy(s3_env, fail_requests))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_transient_5xx_answers_are_retried(flaky_proxy, s3_env: str, s3_bucket: str) -> None:
    # Requests: HEAD bucket, PUT bucket, PUT object, GET object; each fails once before it works.
    proxy = flaky_proxy({1, 3, 5, 7})
    store = S3Store(s3_bucket, config_for(proxy.endpoint), RetryPolicy(total_seconds=10, initial_backoff=0.05))

    store.put_json("jobs/default/a/logs/progress.json", {"step": 7})
    assert store.get_json("jobs/default/a/logs/progress.json") == {"step": 7}

    assert proxy.failed == 4 and proxy.requests == 8
    response = raw_client(s3_env).get_object(s3_bucket, "jobs/default/a/logs/progress.json")
    assert json.loads(response.read()) == {"step": 7}


def test_persistent_5xx_becomes_store_unavailable(flaky_proxy) -> None:
    proxy = flaky_proxy(None)
    store = S3Store("tessera", config_for(proxy.endpoint), RetryPolicy(total_seconds=0.6, initial_backoff=0.05))
    with pytest.raises(StoreUnavailableError, match="store unavailable") as failure:
        store.get_bytes("adapters/default/fpb/v1/adapter_config.json")
    assert proxy.failed >= 3
    assert proxy.endpoint in str(failure.value)
    assert SECRET_KEY not in str(failure.value) and ACCESS_KEY not in str(failure.value)


def test_reads_never_create_a_bucket_writes_do(s3_env: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket)
    with pytest.raises(ObjectNotFoundError, match=f"bucket '{s3_bucket}' does not exist"):
        store.list("adapters")
    assert not store.exists("adapters/default")
    assert not raw_client(s3_env).bucket_exists(s3_bucket)

    store.put_bytes("datasets/fpb.csv", b"sentence,label\n")
    assert raw_client(s3_env).bucket_exists(s3_bucket)


def test_a_publish_is_a_plain_directory_to_other_s3_readers(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    S3Store(s3_bucket).publish_dir(adapter, "adapters/default/fpb/v1")

    raw = raw_client(s3_env)
    keys = sorted(o.object_name for o in raw.list_objects(s3_bucket, recursive=True))
    assert keys == [
        f"adapters/default/fpb/v1/{COMPLETE_MARKER}",
        "adapters/default/fpb/v1/adapter_config.json",
        "adapters/default/fpb/v1/adapter_model.safetensors",
    ]
    marker = json.loads(raw.get_object(s3_bucket, f"adapters/default/fpb/v1/{COMPLETE_MARKER}").read())
    assert marker["files"]["adapter_model.safetensors"] == hashlib.sha256(b"\x00" * 1000).hexdigest()


def test_the_complete_marker_is_written_only_once(s3_env: str, s3_bucket: str) -> None:
    """Two publishers racing for one version: the server's If-None-Match lets exactly one win."""
    store = S3Store(s3_bucket)
    store.put_bytes("placeholder", b"")
    assert store._create_exclusive("adapters/x/v1/_COMPLETE", b'{"publishId": "first"}')
    assert not store._create_exclusive("adapters/x/v1/_COMPLETE", b'{"publishId": "second"}')
    assert raw_client(s3_env).get_object(s3_bucket, "adapters/x/v1/_COMPLETE").read() == b'{"publishId": "first"}'


def test_config_follows_kserve_conventions() -> None:
    config = S3Config.from_env({
        "S3_ENDPOINT": "minio.tessera.svc:9000", "S3_USE_HTTPS": "0",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "eu-west-1",
    })
    assert (config.endpoint, config.secure, config.region) == ("minio.tessera.svc:9000", False, "eu-west-1")
    assert config.endpoint_url == "http://minio.tessera.svc:9000"
    assert SECRET_KEY not in repr(config) and SECRET_KEY not in str(config.model_dump())
    assert config.redact(f"sig by {ACCESS_KEY}/{SECRET_KEY}") == "sig by ***/***"

    url_config = S3Config.from_env({"S3_ENDPOINT": "https://minio.example:9443"})
    assert (url_config.endpoint, url_config.secure, url_config.access_key) == ("minio.example:9443", True, None)
    assert S3Config.from_env({}).endpoint_url == "https://s3.amazonaws.com"

    with pytest.raises(StoreError, match="S3_USE_HTTPS"):
        S3Config.from_env({"S3_ENDPOINT": "minio:9000", "S3_USE_HTTPS": "maybe"})
    with pytest.raises(StoreError, match="both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Config.from_env({"AWS_ACCESS_KEY_ID": ACCESS_KEY})
    with pytest.raises(StoreError, match="S3_ENDPOINT"):
        S3Config.from_env({"S3_ENDPOINT": "ftp://minio:21"})


def test_retry_budget_and_backoff() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    def refused() -> None:
        raise ConnectionRefusedError("connection refused")

    policy = RetryPolicy(total_seconds=10, initial_backoff=1, max_backoff=4)
    with pytest.raises(RetriesExhausted) as gave_up:
        call_with_retry(refused, policy, lambda e: isinstance(e, ConnectionError), clock=lambda: now[0], sleep=sleep)
    assert sum(sleeps) <= 10
    assert gave_up.value.attempts == len(sleeps) + 1 >= 3
    assert all(later >= earlier * 0.5 for earlier, later in zip(sleeps, sleeps[1:], strict=False))
    assert max(sleeps) <= 4

    calls = []

    def missing() -> None:
        calls.append(1)
        raise KeyError("no such object")

    with pytest.raises(KeyError):
        call_with_retry(missing, policy, lambda e: isinstance(e, ConnectionError), sleep=sleep)
    assert len(calls) == 1  # not transient: no retry

    assert RetryPolicy.from_env({"TESSERA_STORE_RETRY_SECONDS": "2.5"}).total_seconds == 2.5
    with pytest.raises(StoreError, match="TESSERA_STORE_RETRY_SECONDS"):
        RetryPolicy.from_env({"TESSERA_STORE_RETRY_SECONDS": "soon"})
