"""The agent in front of vLLM. vLLM cannot run here (CUDA only, its wheel too large to carry), so
`FakeVllm` stands in for it, answering as vLLM's own code does (see its docstring); the agent runs
in-process on a real port, and adapters come from a local directory the agent is allowed to read.
The pure mapping of each documented answer is tested first, with vLLM's exact bodies.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from tessera.adapter_format.runtime import RuntimeProfile
from tessera.agent.agent import AdapterAgent
from tessera.agent.app import build_app
from tessera.agent.rules import classify_load, classify_unload

from tests.agent.conftest import free_port
from tests.agent.fake_vllm import FakeVllm


def vllm_error(message: str, kind: str, code: int) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (200, "Success: LoRA adapter 'fpb' added successfully.", "loaded"),
    (400, vllm_error("The lora adapter 'fpb' has already been loaded. If you want to load the adapter in place, "
                     "set 'load_inplace' to True.", "InvalidUserInput", 400), "already_loaded"),
    # vLLM before ErrorInfo: the message at the top level.
    (400, json.dumps({"object": "error", "message": "The lora adapter 'fpb' has already been loaded.",
                      "type": "InvalidUserInput", "code": 400}), "already_loaded"),
    (404, vllm_error("Loading lora fpb failed: No adapter found for /mnt/adapters/fpb", "NotFoundError", 404),
     "not_found"),
    (500, vllm_error("LoRA rank 64 is greater than max_lora_rank 16.", "InternalServerError", 500), "rank_too_high"),
    (400, vllm_error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400), "refused"),
    (500, vllm_error("CUDA out of memory", "InternalServerError", 500), "failed"),
])
def test_each_documented_load_answer_has_one_outcome(status, body, outcome):
    answer = classify_load(status, body)
    assert answer.outcome == outcome
    assert "{" not in answer.message  # the message, not the JSON around it


def test_unload_answers():
    assert classify_unload(200, "Success: LoRA adapter 'fpb' removed successfully.").outcome == "unloaded"
    assert classify_unload(404, vllm_error("The lora adapter 'x' cannot be found.", "NotFoundError", 404)).outcome \
        == "not_found"
    assert classify_unload(500, vllm_error("Failed to remove lora adapter 'x' from the engine.",
                                           "InternalServerError", 500)).outcome == "failed"


class InProcessAgent:
    """The agent's aiohttp app on a real port, on its own loop in a thread."""

    def __init__(self, agent: AdapterAgent) -> None:
        self.port = free_port()
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessAgent:
        self.thread.start()

        async def start() -> None:
            self.runner = web.AppRunner(build_app(self.agent, resync_seconds=0.2))
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def vllm():
    fake = FakeVllm(free_port(), max_lora_rank=16).start()
    yield fake
    fake.stop()


@pytest.fixture
def sources(made_adapters) -> Path:
    return made_adapters["fpb"].parent


def agent_for(vllm: FakeVllm, shared: Path, sources: Path, max_rank: int = 16) -> InProcessAgent:
    return InProcessAgent(AdapterAgent(RuntimeProfile("vllm", max_rank), vllm.url, shared,
                                       allowed_prefixes=[str(sources)]))


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def test_plain_text_success_loads_from_the_shared_volume(vllm, sources, tmp_path):
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        response = post(agent.url, "/v1/load_lora_adapter", {"lora_name": "fpb", "lora_path": str(sources / "fpb")})
        assert response.status_code == 200, response.text
        assert response.json()["message"] == "Success: LoRA adapter 'fpb' added successfully."
        (kind, body), = vllm.requests
        assert kind == "load" and Path(body["lora_path"]).parent == tmp_path / "shared" / "fpb"
        assert body["load_inplace"] is False
        card = {c["id"]: c for c in httpx.get(f"{agent.url}/v1/models").json()["data"]}["fpb"]
        assert card["root"] == str(sources / "fpb")


def test_already_loaded_by_vllm_is_replaced_in_place(vllm, sources, tmp_path):
    vllm.loras["fpb"] = "/elsewhere/old-version"  # loaded before this agent started
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        response = post(agent.url, "/v1/load_lora_adapter", {"lora_name": "fpb", "lora_path": str(sources / "fpb")})
        assert response.status_code == 200, response.text
        assert [body["load_inplace"] for _, body in vllm.requests] == [False, True]
        assert Path(vllm.loras["fpb"]).parent == tmp_path / "shared" / "fpb"


def test_a_new_version_of_a_loaded_adapter_goes_in_place(vllm, sources, tmp_path):
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        for version in ("fpb", "fpb-v2"):
            body = {"lora_name": "fpb", "lora_path": str(sources / version)}
            response = post(agent.url, "/v1/load_lora_adapter", body)
            assert response.status_code == 200, response.text
        assert [body["load_inplace"] for _, body in vllm.requests] == [False, False, True]
        assert len(list((tmp_path / "shared" / "fpb").iterdir())) == 1


def test_vllm_404_on_the_path_means_the_volume_is_not_shared(vllm, sources, tmp_path):
    agent = AdapterAgent(RuntimeProfile("vllm", 16), vllm.url, tmp_path / "shared", allowed_prefixes=[str(sources)])
    original = agent._prepare

    def prepare_then_hide(request):  # what vLLM sees when the volume is not mounted in its container
        held = original(request)
        held.path = str(tmp_path / "not-mounted" / held.name)
        return held

    agent._prepare = prepare_then_hide
    with InProcessAgent(agent) as running:
        response = post(running.url, "/v1/load_lora_adapter", {"lora_name": "fpb", "lora_path": str(sources / "fpb")})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "runtime_cannot_read" and "same path" in error["message"]


def test_vllm_500_on_rank_becomes_a_clear_refusal(vllm, sources, tmp_path):
    """The agent was told a higher maximum than vLLM's: vLLM's 500 is the adapter's fault, not the server's."""
    with agent_for(vllm, tmp_path / "shared", sources, max_rank=64) as agent:
        response = post(agent.url, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(sources / "rank32")})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "rank_too_high"
    assert "the vllm runtime refused the adapter's rank 32" in error["message"]
    assert not (tmp_path / "shared" / "big").exists()


def test_modules_to_save_never_reaches_vllm(vllm, sources, tmp_path):
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        response = post(agent.url, "/v1/load_lora_adapter", {"lora_name": "s", "lora_path": str(sources / "saving")})
    assert response.status_code == 400
    assert "modules_to_save=['lm_head']: the vllm runtime does not serve" in response.json()["error"]["message"]
    assert vllm.requests == []


def test_unload_and_vllm_404_for_an_unknown_name(vllm, sources, tmp_path):
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        assert post(agent.url, "/v1/load_lora_adapter", {"lora_name": "fpb", "lora_path": str(sources / "fpb")}) \
            .status_code == 200
        assert post(agent.url, "/v1/unload_lora_adapter", {"lora_name": "fpb"}).status_code == 200
        assert "fpb" not in vllm.loras and not (tmp_path / "shared" / "fpb").exists()
        missing = post(agent.url, "/v1/unload_lora_adapter", {"lora_name": "fpb"})
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "The lora adapter 'fpb' cannot be found."


def test_vllm_restart_brings_the_adapters_back(vllm, sources, tmp_path):
    with agent_for(vllm, tmp_path / "shared", sources) as agent:
        for name in ("fpb", "fpb-v2"):
            assert post(agent.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(sources / name)}) \
                .status_code == 200
        vllm.restart()
        deadline = time.monotonic() + 10
        while set(vllm.loras) != {"fpb", "fpb-v2"}:
            assert time.monotonic() < deadline, vllm.loras
            time.sleep(0.1)
        assert httpx.get(f"{agent.url}/v1/agent/status").json()["adapters"][0]["problem"] == ""
