"""Kubeflow Trainer v2's runtime status server (KEP-2779) on 127.0.0.1, for tests.

Stands in for `pkg/statusserver` of the Trainer controller (v2.2+, feature gate
`TrainJobStatus`): HTTPS with a certificate from the controller's own CA, one route,
`POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status`, a
body of at most 64 kB decoded into `{"trainerStatus": …}`, answers as Kubernetes `Status`
objects (403 Forbidden, 422 Invalid, 404 NotFound). Upstream authorises the bearer token with a
TokenReview and checks that the pod it was issued to belongs to the TrainJob; here the test-side
TrainJob controller registers the token it hands to each TrainJob's pods (`issue_token`), which is
the same rule with the API server's part played by a table. The body is checked against the
TrainJob CRD's `status.trainerStatus` schema, as the API server's status update would.

Accepted statuses go to `on_status(namespace, name, trainerStatus)` (the controller patches them
into the TrainJob) and are kept in `received`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.crds.schemas import to_json_schema

ROUTE = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs/([^/]+)/status$")
MAX_BODY = 1 << 16
TRAINJOB_CRD = Path(__file__).resolve().parents[1] / "crds" / "trainer-v2.3.0" / "trainer.kubeflow.org_trainjobs.yaml"


def _trainer_status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(TRAINJOB_CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    return to_json_schema(schema["trainerStatus"])


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, tls.crt, tls.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeflow-trainer-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeflow-trainer-controller")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TrainerStatusServer:
    def __init__(self, directory: Path,
                 on_status: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.ca_file, cert, key = _certificates(directory)
        self.on_status = on_status
        self.tokens: dict[str, tuple[str, str]] = {}
        self.received: list[tuple[str, str, dict[str, Any]]] = []
        self.refused: list[int] = []
        self.validator = jsonschema.Draft7Validator(_trainer_status_schema())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> TrainerStatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, namespace: str, name: str) -> str:
        """`KUBEFLOW_TRAINER_SERVER_URL` for the TrainJob `namespace/name`."""
        port = self.httpd.server_address[1]
        return f"https://127.0.0.1:{port}/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"

    def issue_token(self, namespace: str, name: str) -> str:
        """A token that authorises status updates of that TrainJob only (the projected SA token)."""
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (namespace, name)
        return token

    def _accept(self, namespace: str, name: str, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else ""
        if self.tokens.get(token) != (namespace, name):
            return 403, _status(403, "Forbidden", "Forbidden")
        try:
            request = json.loads(body)
        except ValueError:
            return 422, _status(422, "Invalid", "Invalid payload")
        if not isinstance(request, dict):
            return 422, _status(422, "Invalid", "Invalid payload")
        trainer_status = request.get("trainerStatus")
        if trainer_status is None:
            return 200, request
        problems = [e.message for e in self.validator.iter_errors(trainer_status)]
        if problems:
            return 422, _status(422, "Invalid", "; ".join(problems))
        self.received.append((namespace, name, trainer_status))
        if self.on_status is not None:
            self.on_status(namespace, name, trainer_status)
        return 200, request

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                match = ROUTE.match(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if not match:
                    code, answer = 404, _status(404, "NotFound", "Not found")
                elif length > MAX_BODY:
                    code, answer = 413, _status(413, "RequestEntityTooLarge", "request body too large")
                else:
                    code, answer = server._accept(match.group(1), match.group(2),
                                                  self.headers.get("Authorization", ""), self.rfile.read(length))
                if code != 200:
                    server.refused.append(code)
                payload = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}
