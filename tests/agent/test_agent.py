"""The adapter agent in a simulated predictor pod: the real `tessera adapter-agent` process beside the
real `tessera serve` process, sharing an adapters directory, adapters in an S3 server on 127.0.0.1
(moto, standing in for MinIO). The agent is called with the operator's own client
(`tessera_operator.serving.AdapterApi`), as the operator calls it in a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from tessera.api import Adapter
from tessera_operator.serving import AdapterApi, Backoff, Replica, sync_replica

from tests.agent.conftest import Process, free_port, get_json, tessera, wait_until
from tests.serve.helpers import TINY_NAME, s3_environment

pytestmark = pytest.mark.slow


def adapter(name: str, uri: str, sha256: str | None) -> Adapter:
    return Adapter.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "Adapter",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"baseModel": {"uri": "s3://agent-adapters/models/tiny", "name": TINY_NAME}, "uri": uri,
                 "sha256": sha256, "credentialsSecret": "tessera-store"},
    })


def digest(path: Path) -> str:
    from tessera.adapter_format import weights_sha256

    return weights_sha256(path)


def load(agent_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{agent_url}/v1/load_lora_adapter", json=body, timeout=60)


def runtime_cards(pod) -> dict[str, dict]:
    status, body = get_json(f"{pod['runtime'].url}/v1/models")
    assert status == 200
    return {card["id"]: card for card in body["data"]}


def test_loads_from_s3_with_its_digest_into_the_runtime_through_the_operators_client(pod, made_adapters, s3_adapters):
    agent, shared = pod["agent"], pod["shared"]
    wanted = adapter("fpb", s3_adapters["fpb"], digest(made_adapters["fpb"]))
    api, replica = AdapterApi(), Replica("predictor-0", "uid-0", agent.url)

    started = time.perf_counter()
    entry = sync_replica(api, replica, wanted, Backoff())
    print(f"hot-load through the agent (S3 fetch, sha256, checks, runtime load): {time.perf_counter() - started:.3f}s")
    assert entry["state"] == "Loaded", entry
    # The runtime loaded it from the shared volume, the verified copy named by its digest.
    served = runtime_cards(pod)["fpb"]
    assert Path(served["root"]) == shared / "fpb" / wanted.spec.sha256
    assert served["sha256"] == wanted.spec.sha256
    # The operator sees the store URI and digest it asked for: a second pass does nothing.
    assert api.cards(replica)["fpb"]["root"] == s3_adapters["fpb"]
    assert sync_replica(api, replica, wanted, Backoff())["state"] == "Loaded"
    answer = httpx.post(f"{pod['runtime'].url}/v1/completions",
                        json={"model": "fpb", "prompt": "Profits rose", "max_tokens": 2}, timeout=30)
    assert answer.status_code == 200 and answer.json()["model"] == "fpb"


def test_a_new_version_replaces_the_old_one_and_its_files(pod, made_adapters, s3_adapters):
    agent, shared = pod["agent"], pod["shared"]
    first = load(agent.url, {"lora_name": "swap", "lora_path": s3_adapters["fpb"]})
    assert first.status_code == 200, first.text
    second = load(agent.url, {"lora_name": "swap", "lora_path": s3_adapters["fpb-v2"],
                              "sha256": digest(made_adapters["fpb-v2"])})
    assert second.status_code == 200, second.text
    assert [p.name for p in (shared / "swap").iterdir()] == [digest(made_adapters["fpb-v2"])]
    assert runtime_cards(pod)["swap"]["sha256"] == digest(made_adapters["fpb-v2"])


def test_a_download_that_does_not_match_its_digest_is_refused_and_leaves_nothing(pod, s3_adapters):
    agent, shared = pod["agent"], pod["shared"]
    response = load(agent.url, {"lora_name": "tampered", "lora_path": s3_adapters["fpb"], "sha256": "0" * 64})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "sha256_mismatch" and "0" * 64 in error["message"]
    assert "tampered" not in runtime_cards(pod)
    assert not (shared / "tampered").exists()
    assert not [p for p in shared.iterdir() if p.name.startswith(".staging-")]
    # The operator records the refusal and backs off instead of hammering the store.
    backoff = Backoff()
    entry = sync_replica(AdapterApi(), Replica("p", "u", agent.url), adapter("tampered", s3_adapters["fpb"], "0" * 64),
                         backoff)
    assert entry["state"] == "Failed" and "sha256" in entry["message"] and backoff.attempts == 1


@pytest.mark.parametrize(("name", "field"), [("rank32", "rank 32 exceeds the maximum 16 of the tessera runtime"),
                                             ("saving", "modules_to_save=['lm_head']: the tessera runtime")])
def test_what_the_runtime_cannot_serve_is_refused_before_it_is_offered(pod, s3_adapters, name, field):
    response = load(pod["agent"].url, {"lora_name": name, "lora_path": s3_adapters[name]})
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]
    assert name not in runtime_cards(pod) and not (pod["shared"] / name).exists()


def test_paths_outside_the_allowed_prefixes_and_bad_bodies_are_refused(pod, made_adapters):
    agent = pod["agent"]
    outside = load(agent.url, {"lora_name": "local", "lora_path": str(made_adapters["fpb"])})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "path_not_allowed"
    for body in ({"lora_name": "../x", "lora_path": "s3://agent-adapters/a"}, {"lora_name": "x"}):
        response = load(agent.url, body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    assert httpx.post(f"{agent.url}/v1/load_lora_adapter", content=b"{", timeout=10).status_code == 400


def test_unload_removes_it_from_the_runtime_and_the_volume(pod, s3_adapters):
    agent, shared = pod["agent"], pod["shared"]
    assert load(agent.url, {"lora_name": "gone", "lora_path": s3_adapters["fpb"]}).status_code == 200
    assert (shared / "gone").is_dir()
    api, replica = AdapterApi(), Replica("p", "u", agent.url)
    api.unload(replica, "gone")
    assert "gone" not in runtime_cards(pod) and not (shared / "gone").exists()
    again = httpx.post(f"{agent.url}/v1/unload_lora_adapter", json={"lora_name": "gone"}, timeout=10)
    assert again.status_code == 404 and "cannot be found" in again.json()["error"]["message"]
    api.unload(replica, "gone")  # the operator's unload of what is not there is no error


def test_a_restarted_runtime_gets_its_adapters_back(pod, s3_adapters):
    agent, runtime = pod["agent"], pod["runtime"]
    assert load(agent.url, {"lora_name": "survivor", "lora_path": s3_adapters["fpb"]}).status_code == 200
    runtime.stop()
    # While the runtime is down, the operator's view says so and nothing is claimed loaded.
    assert httpx.get(f"{agent.url}/v1/models", timeout=10).status_code == 503
    runtime.start()
    wait_until(lambda: get_json(f"{runtime.url}/v2/health/ready")[0] == 200, 120, "tessera serve back", runtime.log)
    wait_until(lambda: "survivor" in runtime_cards(pod), 30, "the agent reloaded the adapter", agent.log)
    assert Path(runtime_cards(pod)["survivor"]["root"]).parent == pod["shared"] / "survivor"


def test_a_restarted_agent_remembers_what_it_holds(pod, s3_adapters):
    agent = pod["agent"]
    assert load(agent.url, {"lora_name": "kept", "lora_path": s3_adapters["fpb"]}).status_code == 200
    agent.stop()
    agent.start()
    wait_until(lambda: get_json(f"{agent.url}/healthz")[0] == 200, 60, "the agent restarted", agent.log)
    cards = {c["id"]: c for c in get_json(f"{agent.url}/v1/models")[1]["data"]}
    assert cards["kept"]["root"] == s3_adapters["fpb"]


def test_store_down_gives_bounded_retries_and_a_clear_status(tmp_path, s3_server):
    """The agent's store is an address nothing listens on: the load fails within the retry budget,
    with a 503 the operator retries, and the credentials appear in no answer and no log line."""
    fake = free_port()
    env = {**os.environ, **s3_environment(f"http://127.0.0.1:{free_port()}"), "TESSERA_STORE_RETRY_SECONDS": "1"}
    agent = Process(tessera("adapter-agent", "--runtime", "vllm", "--runtime-url", f"http://127.0.0.1:{fake}",
                            "--adapters-dir", str(tmp_path / "shared"), "--port", "{port}"),
                    env, tmp_path / "agent.log", free_port())
    agent.command = [part.replace("{port}", str(agent.port)) for part in agent.command]
    agent.start()
    try:
        wait_until(lambda: get_json(f"{agent.url}/healthz")[0] == 200, 60, "the agent did not start", agent.log)
        started = time.monotonic()
        response = load(agent.url, {"lora_name": "fpb", "lora_path": "s3://agent-adapters/adapters/default/fpb/v1"})
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "store_unavailable" and "store" in error["message"]
        print(f"store down: refused after {elapsed:.1f}s")
        assert not [p for p in (tmp_path / "shared").iterdir() if p.name.startswith(".staging-")]
    finally:
        agent.stop()
    secret = s3_environment(s3_server)["AWS_SECRET_ACCESS_KEY"]
    assert secret not in response.text and secret not in agent.log.read_text()


def test_the_agent_imports_no_torch():
    """It runs in the operator image, which has no torch."""
    probe = "import sys, tessera.agent.app, tessera.cli; print('torch' in sys.modules)"
    result = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_state_file_is_json_the_agent_wrote(pod):
    state = json.loads((pod["shared"] / ".agent-state.json").read_text())
    assert {entry["name"] for entry in state} >= {"fpb"}
