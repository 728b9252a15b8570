"""The `tessera` ClusterServingRuntime's predictor pod, run as local processes: its two containers'
commands, arguments and plain env as the chart renders them start `tessera serve` and the adapter
agent, the probe paths the chart gives KServe answer, and the agent loads an adapter from the store
into the server through the shared volume.

What stands in for the pod: no kubelet or KServe runs here. Each container is a process with the
pod's paths mapped to a temporary directory: /mnt/models (where KServe's storage initializer puts
the base model) holds the tiny base model, /mnt/adapters (the emptyDir both containers mount) is
one local directory. Bind addresses and ports become 127.0.0.1 and free ports; the store Secret's
keys come from the session's S3 server (moto, standing in for MinIO), and so does S3_ENDPOINT, which
the chart sets to the in-cluster MinIO.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.chart.helm import one, render
from tests.processes import stop
from tests.serve.helpers import s3_environment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


# Keys mode: no API server for TokenReview here. The pod's own callers (the agent, the probes) need no key.
VALUES = {"auth.mode": "keys"}


def pod() -> dict[str, dict[str, Any]]:
    spec = one([d for d in render(VALUES) if d["kind"] == "ClusterServingRuntime"
                and d["metadata"]["name"] == "tessera"], "ClusterServingRuntime")["spec"]
    return {c["name"]: c for c in spec["containers"]}


def access_files(root: Path) -> dict[str, Path]:
    """The quota ConfigMap as the chart renders it, and a keys file (the Secret an admin creates)."""
    (quotas,) = [d for d in render(VALUES) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tessera-quotas"]
    (root / "quotas").mkdir()
    (root / "quotas" / "quotas.json").write_text(quotas["data"]["quotas.json"])
    (root / "keys").mkdir()
    (root / "keys" / "keys.json").write_text(json.dumps({"keys": {}, "grants": []}))
    return {"/etc/tessera/quotas": root / "quotas", "/etc/tessera/keys": root / "keys"}


def local_command(container: dict[str, Any], paths: dict[str, Path], ports: dict[int, int]) -> list[str]:
    """The container's argv with its mount paths, bind address and ports mapped to this machine."""
    args = []
    for arg in container["args"]:
        for mount, local in paths.items():
            arg = arg.replace(mount, str(local))
        if arg.startswith("--host="):  # a pod binds every address; here, loopback only
            arg = "--host=127.0.0.1"
        for port, local_port in ports.items():
            arg = re.sub(rf"([=:]){port}$", rf"\g<1>{local_port}", arg)
        args.append(arg)
    executable = shutil.which(container["command"][0])
    assert executable, f"{container['command'][0]} is not installed"
    return [executable, *container["command"][1:], *args]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback URL)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


@pytest.fixture
def start_pod(tiny_model: Path, tmp_path: Path, s3_server: str) -> Iterator[Any]:
    started: list[subprocess.Popen] = []

    def start() -> tuple[dict[str, dict[str, Any]], dict[int, int], Path]:
        containers = pod()
        server, agent = containers["kserve-container"], containers["adapter-agent"]
        paths = {"/mnt/models": tiny_model, "/mnt/adapters": tmp_path / "adapters", **access_files(tmp_path)}
        (tmp_path / "adapters").mkdir()
        ports = {p["containerPort"]: _unused_port() for c in (server, agent) for p in c["ports"]}
        for container in (server, agent):
            env = os.environ | {e["name"]: e["value"] for e in container["env"] if "value" in e}
            env |= {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
            if container.get("envFrom"):  # the store Secret
                env |= s3_environment(s3_server)
            with (tmp_path / f"{container['name']}.log").open("wb") as output:
                started.append(subprocess.Popen(local_command(container, paths, ports), env=env, stdout=output,
                                                stderr=subprocess.STDOUT))
        startup = server["startupProbe"]
        deadline = time.monotonic() + min(startup["periodSeconds"] * startup["failureThreshold"], 180)
        while get(probe_url(server, "startupProbe", ports))[0] != 200:
            assert started[0].poll() is None, f"tessera serve exited:\n{log_of(tmp_path, server)}"
            assert time.monotonic() < deadline, f"startup probe never passed:\n{log_of(tmp_path, server)}"
            time.sleep(0.5)
        return containers, ports, tmp_path

    yield start
    for process in started:
        stop(process)


def log_of(root: Path, container: dict[str, Any]) -> str:
    return (root / f"{container['name']}.log").read_text()[-3000:]


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def probe_url(container: dict[str, Any], probe: str, ports: dict[int, int]) -> str:
    get_ = container[probe]["httpGet"]
    port = get_["port"] if isinstance(get_["port"], int) else next(
        p["containerPort"] for p in container["ports"] if p.get("name") == get_["port"])
    return f"http://127.0.0.1:{ports[port]}{get_['path']}"


def wait_ready(container: dict[str, Any], ports: dict[int, int], root: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while get(probe_url(container, "readinessProbe", ports))[0] != 200:
        assert time.monotonic() < deadline, f"readiness probe never passed:\n{log_of(root, container)}"
        time.sleep(0.5)


def test_runtime_container_serves_its_probes_and_metrics(start_pod: Any) -> None:
    containers, ports, root = start_pod()
    server = containers["kserve-container"]
    assert get(probe_url(server, "livenessProbe", ports))[0] == 200
    wait_ready(server, ports, root)
    status, body = get(f"http://127.0.0.1:{ports[8080]}/metrics")
    assert status == 200 and "# HELP" in body
    status, body = get(f"http://127.0.0.1:{ports[8080]}/openai/v1/models")
    assert status == 200 and "tiny" in body


def test_agent_container_brings_an_adapter_from_the_store_into_the_server(start_pod: Any, tiny_model: Path,
                                                                          s3_server: str, tmp_path: Path) -> None:
    """The operator's client, pointed at the agent's port, loads an adapter published under the chart's
    store URI; the server then answers with it, having read it from the shared volume only."""
    from tessera.adapter_format import weights_sha256
    from tessera.api import Adapter
    from tessera.store import push
    from tessera_operator.serving import AdapterApi, Backoff, Replica, sync_replica

    from tests.serve.helpers import make_adapter

    made = make_adapter(tiny_model, tmp_path / "made" / "fpb", seed=1)
    with mock.patch.dict(os.environ, s3_environment(s3_server)):
        uri = push(made, "s3://tessera/adapters/default/fpb/v1")
    containers, ports, root = start_pod()
    agent = containers["adapter-agent"]
    wait_ready(containers["kserve-container"], ports, root)
    wait_ready(agent, ports, root)
    adapter = Adapter.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "Adapter", "metadata": {"name": "fpb", "namespace": "default"},
        "spec": {"baseModel": {"uri": "s3://tessera/models/tiny"}, "uri": uri, "sha256": weights_sha256(made),
                 "credentialsSecret": "tessera-store"}})
    replica = Replica("predictor-0", "uid", f"http://127.0.0.1:{ports[agent['ports'][0]['containerPort']]}")
    entry = sync_replica(AdapterApi(), replica, adapter, Backoff())
    assert entry["state"] == "Loaded", (entry, log_of(root, agent))
    status, body = get(f"http://127.0.0.1:{ports[8080]}/v1/models")
    card = {c["id"]: c for c in json.loads(body)["data"]}["fpb"]
    assert Path(card["root"]).is_relative_to(root / "adapters")
