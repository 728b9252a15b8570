"""Fixtures for the adapter agent: the real `tessera serve` as its runtime, the real agent process
(`tessera adapter-agent`), PEFT adapters made with peft on the tiny base, and the session's S3
server (moto, standing in for MinIO) holding them.

vLLM cannot run here (CUDA only); `tessera serve` speaks the same adapter API, and
`fake_vllm.FakeVllm` answers as vLLM documents it does, for the answers `tessera serve` never gives.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from tests.processes import stop
from tests.serve.helpers import TINY_NAME, make_adapter, s3_environment

AGENT_MAX_RANK = 16
BUCKET = "agent-adapters"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def wait_until(check, seconds: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds}s" + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.2)


@dataclass
class Process:
    command: list[str]
    env: dict[str, str]
    log: Path
    port: int
    handle: subprocess.Popen | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        with self.log.open("ab") as output:
            self.handle = subprocess.Popen(self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.handle is not None and self.handle.poll() is None:
            stop(self.handle)


def tessera(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tessera.cli import main; main()", *args]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("agent-models") / "tiny-llama")


@pytest.fixture(scope="session")
def made_adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters: two good ones, one of rank 32 (above the agent's 16), one with modules_to_save."""
    root = tmp_path_factory.mktemp("agent-adapters")
    made = {name: make_adapter(tiny_base, root / name, seed=seed) for name, seed in (("fpb", 1), ("fpb-v2", 2))}
    made["rank32"] = make_adapter(tiny_base, root / "rank32", seed=3, rank=32)
    saving = make_adapter(tiny_base, root / "saving", seed=4)
    config = json.loads((saving / "adapter_config.json").read_text())
    (saving / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    made["saving"] = saving
    return made


@pytest.fixture(scope="session")
def s3_adapters(made_adapters, s3_server) -> dict[str, str]:
    """name → s3:// URI of each adapter, uploaded with the store the platform publishes with."""
    from tessera.store import push

    with mock.patch.dict(os.environ, s3_environment(s3_server)):
        return {name: push(path, f"s3://{BUCKET}/adapters/default/{name}/v1") for name, path in made_adapters.items()}


@pytest.fixture(scope="module")
def pod(tiny_base, s3_server, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """A predictor pod's two containers as processes: `tessera serve` and the agent beside it, sharing
    the adapters directory. The runtime accepts adapters from that directory only, as in the chart."""
    root = tmp_path_factory.mktemp("pod")
    shared = root / "adapters"
    shared.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **s3_environment(s3_server), "TESSERA_STORE_RETRY_SECONDS": "2"}
    runtime = Process(tessera("serve", "--model", str(tiny_base), "--port", "{port}", "--max-lora-rank", "64",
                              "--allowed-prefix", str(shared), "--max-loras", "4"),
                      env, root / "runtime.log", free_port())
    runtime.command = [part.replace("{port}", str(runtime.port)) for part in runtime.command]
    agent_port = free_port()
    agent = Process(tessera("adapter-agent", "--runtime", "tessera", "--runtime-url", runtime.url,
                            "--adapters-dir", str(shared), "--port", str(agent_port),
                            "--max-lora-rank", str(AGENT_MAX_RANK), "--base-model", TINY_NAME,
                            "--allowed-prefix", f"s3://{BUCKET}", "--resync-seconds", "0.5"),
                    env, root / "agent.log", agent_port)
    processes = {"runtime": runtime.start(), "agent": agent.start(), "shared": shared}
    try:
        wait_until(lambda: get_json(f"{runtime.url}/v2/health/ready")[0] == 200, 120, "tessera serve not ready",
                   runtime.log)
        wait_until(lambda: get_json(f"{agent.url}/healthz")[0] == 200, 60, "the agent did not start", agent.log)
        yield processes
    finally:
        agent.stop()
        runtime.stop()
