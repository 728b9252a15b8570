"""The ClusterServingRuntime's container, run as a local process: its command and arguments, as
the chart renders them, start `tessera serve`, and the probe paths the chart gives KServe answer.

What stands in for the pod: no kubelet or KServe runs here. The process gets the container's
command, arguments and plain env from the rendered chart, with the pod's paths mapped to a
temporary directory: /mnt/models (where KServe's storage initializer puts the base model) holds
the tiny base model, and the adapter-list ConfigMap's mount is a directory that holds the list,
or nothing, as when the optional ConfigMap does not exist. The bind address and port become
127.0.0.1 and a free port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helm import one, render
from tests.processes import stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


def runtime_container() -> dict[str, Any]:
    return one(render(), "ClusterServingRuntime")["spec"]["containers"][0]


def local_command(container: dict[str, Any], *, model: Path, adapters_dir: Path, port: int) -> list[str]:
    mounts = {m["mountPath"]: adapters_dir for m in container["volumeMounts"] if m["name"] == "adapters"}
    (adapters_mount,) = mounts
    mapped = {"--model": str(model), "--host": "127.0.0.1", "--port": str(port)}
    args = []
    for arg in container["args"]:
        option, _, value = arg.partition("=")
        if option == "--adapters-file":
            value = str(adapters_dir / Path(value).relative_to(adapters_mount))
        args.append(f"{option}={mapped.get(option, value)}")
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


def probe_url(container: dict[str, Any], probe: str, port: int) -> str:
    return f"http://127.0.0.1:{port}{container[probe]['httpGet']['path']}"


@pytest.fixture
def start_runtime(tiny_model: Path, tmp_path: Path, free_port: int) -> Iterator[Any]:
    started: list[subprocess.Popen] = []

    def start(adapter_list: str | None) -> tuple[dict[str, Any], int, Path]:
        container = runtime_container()
        adapters_dir = tmp_path / "adapters"
        adapters_dir.mkdir()
        if adapter_list is not None:
            adapters_file = next(a for a in container["args"] if a.startswith("--adapters-file="))
            (adapters_dir / Path(adapters_file.split("=", 1)[1]).name).write_text(adapter_list)
        env = os.environ | {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env |= {"HF_HOME": str(tmp_path / "hf")}
        log = tmp_path / "serve.log"
        with log.open("wb") as output:
            started.append(subprocess.Popen(
                local_command(container, model=tiny_model, adapters_dir=adapters_dir, port=free_port),
                env=env, stdout=output, stderr=subprocess.STDOUT,
            ))
        startup = container["startupProbe"]
        deadline = time.monotonic() + min(startup["periodSeconds"] * startup["failureThreshold"], 180)
        while get(probe_url(container, "startupProbe", free_port))[0] != 200:
            assert started[0].poll() is None, f"tessera serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"startup probe never passed:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        return container, free_port, log

    yield start
    for process in started:
        stop(process)


def wait_ready(container: dict[str, Any], port: int, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while get(probe_url(container, "readinessProbe", port))[0] != 200:
        assert time.monotonic() < deadline, f"readiness probe never passed:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_runtime_container_serves_its_probes_and_metrics(start_runtime: Any) -> None:
    container, port, log = start_runtime(adapter_list="[]\n")
    assert get(probe_url(container, "livenessProbe", port))[0] == 200
    wait_ready(container, port, log)
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "# HELP" in body
    status, body = get(f"http://127.0.0.1:{port}/openai/v1/models")
    assert status == 200 and "tiny" in body


def test_runtime_turns_ready_without_the_adapter_list_configmap(start_runtime: Any) -> None:
    container, port, log = start_runtime(adapter_list=None)
    wait_ready(container, port, log, seconds=5)
