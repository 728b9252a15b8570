"""Fixtures for the server tests: the tiny base model, PEFT adapters made with peft, a live server.

Adapters are real PEFT directories written by `peft.save_pretrained`: random ones (LoRA B weights
perturbed so each adapter answers differently) and two trained in a few seconds to answer one
sentiment label, so classification through KServe can be checked against a known answer.
The server is the real `tessera serve` process on 127.0.0.1; the S3 store it reads adapters from
is the session's moto server (it stands in for MinIO).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import stop
from tests.serve.helpers import (
    ALL_TARGETS,
    MAX_LORA_RANK,
    MAX_LORAS,
    S3_BUCKET,
    RunningServer,
    make_adapter,
    other_base_model,
    s3_environment,
    train_label_adapter,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapters_root(tmp_path_factory) -> Path:
    """The one directory the server allows local adapters from."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def startup_adapter(tiny_base, adapters_root) -> Path:
    return make_adapter(tiny_base, adapters_root / "a0", seed=0)


@pytest.fixture(scope="session")
def adapters(tiny_base, adapters_root, startup_adapter, server_process, tmp_path_factory) -> dict[str, Path]:
    """name -> adapter directory, all under `adapters_root` but one made on another base model.

    Depends on `server_process` only so that the server boots while these are made.
    """
    root = adapters_root
    made = {"a0": startup_adapter}
    made.update({f"a{i}": make_adapter(tiny_base, root / f"a{i}", seed=i) for i in range(1, 6)})
    made["rank32"] = make_adapter(tiny_base, root / "rank32", seed=10, rank=32)
    # LoRA on the token embedding too (as examples/tfns-sentiment.yaml trains), and on it alone.
    made["embed"] = make_adapter(tiny_base, root / "embed", seed=13, targets=[*ALL_TARGETS, "embed_tokens"])
    made["embed-only"] = make_adapter(tiny_base, root / "embed-only", seed=14, targets=["embed_tokens"])
    made["wrong-name"] = make_adapter(tiny_base, root / "wrong-name", seed=11,
                                      base_name="meta-llama/Llama-3.1-8B-Instruct")
    other = other_base_model(tmp_path_factory.mktemp("other") / "other-llama")
    made["other-base"] = make_adapter(other, root / "other-base", seed=12, base_name="acme/other-llama")
    corrupt = shutil.copytree(made["a0"], root / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    made["corrupt"] = corrupt
    made["positive"] = train_label_adapter(tiny_base, root / "positive", "positive")
    made["negative"] = train_label_adapter(tiny_base, root / "negative", "negative")
    return made


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def server_process(tiny_base, startup_adapter, adapters_root, s3_server, tmp_path_factory):
    """Starts `tessera serve` without waiting, so the other adapters are made while it boots.

    The base model is served from S3, where `tessera model upload` put it, as a pod gets it from MinIO.
    """
    from unittest import mock

    from tessera.adapter_format import weights_sha256

    base_uri = f"s3://{S3_BUCKET}/models/tiny-llama"
    with mock.patch.dict(os.environ, s3_environment(s3_server)):
        subprocess.run([sys.executable, "-c", "from tessera.cli import main; main()", "model", "upload",
                        str(tiny_base), base_uri], check=True, capture_output=True, timeout=120)

    workdir = tmp_path_factory.mktemp("server")
    adapters_file = workdir / "adapters.yaml"
    adapters_file.write_text(
        f"- name: startup\n  path: {startup_adapter}\n  sha256: {weights_sha256(startup_adapter)}\n"
    )
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **s3_environment(s3_server)}
    command = [
        sys.executable, "-c", "from tessera.cli import main; main()", "serve",
        "--model", base_uri, "--port", str(port), "--adapters-file", str(adapters_file),
        "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK),
        "--allowed-prefix", str(adapters_root), "--allowed-prefix", f"s3://{S3_BUCKET}",
        "--max-batch-size", "32", "--max-wait-ms", "20", "--cache-dir", str(workdir / "cache"),
    ]
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", process, log_path, adapters_root)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def server(server_process, adapters) -> RunningServer:
    """`tessera serve` on 127.0.0.1, ready: start-up adapters file, S3 access, allowed prefixes."""
    port = int(server_process.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 120
    while not (_listening(port) and server_process.get("/v2/health/ready")[0] == 200):
        if server_process.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not become ready:\n{server_process.log.read_text()[-3000:]}")
        time.sleep(0.2)
    return server_process


@pytest.fixture(scope="module")
def client(server):
    """The OpenAI SDK on the shared server, as an application would configure it."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)
