"""A tenant's store key reaches its own prefixes and the shared read-only ones, nothing else.

What stands in for MinIO: no MinIO server binary is installable here (PyPI ships none), so
- the policy document is enforced by moto's server with IAM authentication on
  (INITIAL_NO_AUTH_ACTION_COUNT: the setup's requests pass unauthenticated, every later one is
  checked against the user's policy, as MinIO checks its users' policies); the tenant's requests
  go through the `minio` SDK, as the platform's do;
- the admin calls (`MinioAdmin.policy_add`, `user_add`, `attach_policy`) go to a recording HTTP
  stand-in for MinIO's admin API, which checks paths, the policy body, and that the new secret
  never travels in clear.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from minio import Minio
from minio.credentials import StaticProvider
from minio.error import S3Error
from minio.minioadmin import MinioAdmin
from tessera.api.tenancy import TenancyRules
from tessera.store.tenant_keys import provision_tenant, tenant_policy

from tests.conftest import _unused_port
from tests.processes import stop

RULES = TenancyRules(("s3://tessera",))
SETUP = {"bucket": 1, "objects": 4, "iam": 3}  # the unauthenticated requests the setup makes, in order


@pytest.fixture
def iam_enforcing_s3(tmp_path):
    port = _unused_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": str(sum(SETUP.values())), "PATH": "/usr/bin:/bin"}
    with (tmp_path / "moto.log").open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()  # noqa: S310 (loopback)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
                time.sleep(0.1)
        yield endpoint
    finally:
        stop(server, timeout=10)


def test_the_tenant_policy_allows_its_prefixes_and_the_shared_ones_only(iam_enforcing_s3):
    admin = {"endpoint_url": iam_enforcing_s3, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket="tessera")
    for key in ("datasets/tenant-a/own.csv", "datasets/tenant-b/private.csv", "models/base/config.json",
                "adapters/tenant-b/secret/v1/adapter_model.safetensors"):
        s3.put_object(Bucket="tessera", Key=key, Body=b"x")
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="tessera-tenant-a")
    iam.put_user_policy(UserName="tessera-tenant-a", PolicyName="tessera-tenant-a", PolicyDocument=json.dumps(
        tenant_policy(RULES.tenant_prefixes("tenant-a"), RULES.shared())))
    key = iam.create_access_key(UserName="tessera-tenant-a")["AccessKey"]

    host = iam_enforcing_s3.removeprefix("http://")
    stranger = Minio(host, access_key="nobody", secret_key="nobody-secret", secure=False,  # noqa: S106 (not a key)
                     region="us-east-1")
    with pytest.raises(S3Error):  # the control: authentication is on from here
        stranger.get_object("tessera", "models/base/config.json")
    tenant = Minio(host, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"], secure=False,
                   region="us-east-1")
    for refused in ("datasets/tenant-b/private.csv", "adapters/tenant-b/secret/v1/adapter_model.safetensors"):
        with pytest.raises(S3Error) as error:
            tenant.get_object("tessera", refused)
        assert error.value.code == "AccessDenied"
    with pytest.raises(S3Error) as error:  # shared means read-only
        tenant.put_object("tessera", "models/base/config.json", _bytes(b"y"), 1)
    assert error.value.code == "AccessDenied"
    with pytest.raises(S3Error) as error:
        tenant.put_object("tessera", "jobs/tenant-b/x/prepared/train.jsonl", _bytes(b"y"), 1)
    assert error.value.code == "AccessDenied"
    assert tenant.get_object("tessera", "datasets/tenant-a/own.csv").read() == b"x"
    assert tenant.get_object("tessera", "models/base/config.json").read() == b"x"
    tenant.put_object("tessera", "jobs/tenant-a/j/prepared/train.jsonl", _bytes(b"z"), 1)


def _bytes(data: bytes):
    import io

    return io.BytesIO(data)


class _AdminApi(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, dict, bytes]] = []

    def log_message(self, *_):
        pass

    def _record(self):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).calls.append((self.command, url.path, parse_qs(url.query), body))
        self.send_response(204)
        self.end_headers()

    do_PUT = do_POST = _record  # noqa: N815 (http.server's names)


def test_provisioning_adds_the_policy_the_user_and_attaches_them_through_minio_admin():
    _AdminApi.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AdminApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin = MinioAdmin(endpoint=f"127.0.0.1:{server.server_address[1]}", secure=False,
                           credentials=StaticProvider("minio-admin", "minio-admin-secret"))
        key = provision_tenant(admin, "tenant-a", RULES.tenant_prefixes("tenant-a"), RULES.shared())
    finally:
        server.shutdown()
        server.server_close()
    [(m1, policy_path, policy_query, policy_body), (m2, user_path, user_query, user_body),
     (m3, attach_path, _, attach_body)] = _AdminApi.calls
    assert (m1, policy_path, policy_query["name"]) == ("PUT", "/minio/admin/v3/add-canned-policy", ["tessera-tenant-a"])
    assert json.loads(policy_body) == tenant_policy(RULES.tenant_prefixes("tenant-a"), RULES.shared())
    assert (m2, user_path, user_query["accessKey"]) == ("PUT", "/minio/admin/v3/add-user", [key.access_key])
    assert (m3, attach_path) == ("POST", "/minio/admin/v3/idp/builtin/policy/attach")
    # The secret and the attach request travel encrypted with the admin's key (MinIO's madmin format).
    assert key.secret_key.encode() not in user_body and b"tessera-tenant-a" not in attach_body
    assert len(key.secret_key) >= 40
