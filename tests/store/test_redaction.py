"""One redaction rule for every error, log line, Event and status: no URL userinfo, no secret
environment value, no file content. Probed through the CLI a user runs (`tessera prepare`), the
S3 store's errors, and the log filter every command installs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tessera.errors import DatasetError, StoreError
from tessera.redact import RedactingFilter, redact
from tessera.store import S3Config

REPO = Path(__file__).resolve().parents[2]
CANARY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
JOB = """
apiVersion: tessera.dev/v1alpha1
kind: FineTuneJob
metadata: {name: probe}
spec:
  baseModel: {uri: .tessera/models/tiny-llama}
  dataset: {uri: data.csv, task: sentiment, columns: {text: sentence}}
"""


def test_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AWS_SECRET_ACCESS_KEY": CANARY, "MINIO_ROOT_PASSWORD": "hunter22", "HOME": "/root", "S3_USE_HTTPS": "0"}
    text = (f"GET https://admin:{CANARY}@minio:9000/b failed; s3://user@bucket/x; key={CANARY}; "
            "pw hunter22 at /root")
    cleaned = redact(text, env)
    assert CANARY not in cleaned and "admin" not in cleaned and "user@" not in cleaned and "hunter22" not in cleaned
    assert "https://***@minio:9000/b" in cleaned and "/root" in cleaned  # only secrets go, not ordinary values
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    for error in (DatasetError(f"bad {CANARY}"), StoreError(f"at https://u:p@host/{CANARY}")):
        assert CANARY not in str(error) and "u:p" not in str(error)  # every TesseraError, at creation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("base") / "tiny-llama")


def _prepare(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEPROBE"}
    args = [item for value in sets for item in ("--set", value)]
    return subprocess.run([sys.executable, "-m", "tessera", "prepare", "-f", str(job), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize(("dataset", "refusal"), [
    ("/proc/self/environ", "is a system pseudo-file"),
    ("file:///proc/self/%65nviron", "is a system pseudo-file"),
    ("link-to-environ", "is a system pseudo-file"),
    ("credentials.csv", "dataset credentials.csv has no column"),
])
def test_prepare_never_prints_a_file_or_the_environment(tmp_path: Path, tiny_model: Path, dataset: str,
                                                        refusal: str) -> None:
    """`tessera prepare` pointed at the process environment (directly, percent-encoded, through a
    link) or at a credentials file read as CSV: refused, and nothing of the file is printed. The
    job's base model exists, so each case reaches the dataset (`refusal` says it did)."""
    (tmp_path / ".tessera" / "models").mkdir(parents=True)
    (tmp_path / ".tessera" / "models" / "tiny-llama").symlink_to(tiny_model)
    (tmp_path / "link-to-environ").symlink_to("/proc/self/environ")
    (tmp_path / "credentials.csv").write_text(f"[default]\naws_secret_access_key = {CANARY}\n")
    result = _prepare(tmp_path, f"spec.dataset.uri={dataset}", "spec.dataset.format=csv")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert refusal in output and "does not exist" not in output, output
    assert "Traceback" not in output
    assert CANARY not in output and "AKIAEXAMPLEPROBE" not in output and "PATH=" not in output
    assert "aws_secret_access_key" not in output


@pytest.mark.parametrize("endpoint", ["http://minio:{c}@127.0.0.1:9", "minio:{c}@127.0.0.1:9",
                                      "https://{c}@minio.example"])
def test_an_endpoint_with_userinfo_is_refused_unechoed(endpoint: str) -> None:
    with pytest.raises(StoreError) as caught:
        S3Config.from_env({"S3_ENDPOINT": endpoint.format(c=CANARY)})
    assert CANARY not in str(caught.value) and "must not hold credentials" in str(caught.value)


def test_log_lines_are_redacted_whoever_logs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    record = logging.LogRecord("minio", logging.ERROR, __file__, 1, "request to %s failed: %s", (
        f"http://key:{CANARY}@minio:9000", f"signature {CANARY}"), None)
    try:
        raise RuntimeError(f"boom {CANARY}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    line = logging.Formatter().format(record)
    assert CANARY not in line and "http://***@minio:9000" in line and "boom ***" in line
