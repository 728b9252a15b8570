"""`tessera store ls|cp|rm` against a moto S3 server on 127.0.0.1 (standing in for MinIO).

The round trip runs the typer app in-process; the error cases run the installed `tessera`
command in a subprocess, because what they check (exit code, one-line message, no traceback)
is what `tessera.cli.main` does around the app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from minio import Minio
from tessera.cli import app
from tessera.errors import ObjectNotFoundError
from tessera.store import local_manifest
from typer.testing import CliRunner


def tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = shutil.which("tessera")
    assert command, "the tessera console script is not installed (pip install -e .)"
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(os.urandom(200_000))
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def test_cp_ls_rm_round_trip(s3_env: str, s3_bucket: str, tmp_path: Path, model_dir: Path) -> None:
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["store", *args])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    run("cp", "-r", str(model_dir), f"s3://{s3_bucket}/models/tiny")
    raw = Minio(s3_env.removeprefix("http://"), os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")
    assert sorted(o.object_name for o in raw.list_objects(s3_bucket, recursive=True)) == [
        "models/tiny/config.json", "models/tiny/model.safetensors", "models/tiny/tokenizer/tokenizer.json",
    ]
    assert run("ls", "-r", f"s3://{s3_bucket}/models/tiny").split() == [
        "config.json", "model.safetensors", "tokenizer/tokenizer.json",
    ]
    assert run("ls", f"s3://{s3_bucket}/models/tiny").split() == ["config.json", "model.safetensors", "tokenizer/"]

    run("cp", "-r", f"s3://{s3_bucket}/models/tiny", str(tmp_path / "back"))
    assert local_manifest(tmp_path / "back") == local_manifest(model_dir)

    # A file to a prefix ending in '/' keeps its name; S3 to S3 and S3 to a local file work too.
    run("cp", str(model_dir / "config.json"), f"s3://{s3_bucket}/configs/")
    run("cp", f"s3://{s3_bucket}/configs/config.json", f"s3://{s3_bucket}/copies/llama.json")
    run("cp", f"s3://{s3_bucket}/copies/llama.json", str(tmp_path / "llama.json"))
    assert (tmp_path / "llama.json").read_text() == '{"model_type": "llama"}'

    run("rm", "-r", f"s3://{s3_bucket}/models/tiny")
    run("rm", f"s3://{s3_bucket}/copies/llama.json")
    assert run("ls", "-r", f"s3://{s3_bucket}/").split() == ["configs/config.json"]
    gone = runner.invoke(app, ["store", "ls", f"s3://{s3_bucket}/models/tiny"])
    assert gone.exit_code != 0 and isinstance(gone.exception, ObjectNotFoundError)


def test_errors_are_one_line_and_exit_non_zero(s3_env: str, s3_bucket: str, tmp_path: Path, model_dir: Path) -> None:
    missing = tessera("store", "cp", f"s3://{s3_bucket}/models/none/config.json", str(tmp_path / "x.json"))
    assert missing.returncode != 0
    assert f"s3://{s3_bucket}/models/none/config.json" in missing.stderr
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    without_r = tessera("store", "cp", str(model_dir), f"s3://{s3_bucket}/models/tiny")
    assert without_r.returncode != 0
    assert "copy it with -r" in without_r.stderr and "Traceback" not in without_r.stderr


def test_unreachable_store_from_the_cli(tmp_path: Path, free_port: int, model_dir: Path) -> None:
    secret = "cli-secret-never-printed-42"  # noqa: S105 - must not leak
    result = tessera(
        "store", "cp", "-r", str(model_dir), "s3://tessera/models/tiny",
        env={"S3_ENDPOINT": f"127.0.0.1:{free_port}", "S3_USE_HTTPS": "0", "AWS_ACCESS_KEY_ID": "cli-access",
             "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
             "TESSERA_STORE_RETRY_SECONDS": "0.5"},
    )
    assert result.returncode != 0
    assert "store unavailable" in result.stderr and f"127.0.0.1:{free_port}" in result.stderr
    assert secret not in result.stderr + result.stdout and "Traceback" not in result.stderr
