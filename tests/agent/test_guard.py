"""The adapter API guard vLLM loads with --middleware: the adapter agent in the pod (loopback) may
load and unload, any other caller gets 403, and every other path is untouched. The app it wraps
is a FastAPI app with vLLM's adapter routes, added with `app.add_middleware` as vLLM adds a class
given to --middleware; vLLM itself cannot run here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from tessera.agent.guard import LoopbackOnlyAdapterApi

from tests.chart.helm import of_kind, render


def vllm_like_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/load_lora_adapter")
    async def load() -> PlainTextResponse:
        return PlainTextResponse("Success: LoRA adapter 'x' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload() -> PlainTextResponse:
        return PlainTextResponse("Success: LoRA adapter 'x' removed successfully.")

    @app.post("/v1/completions")
    async def completions() -> dict:
        return {"choices": [{"text": "ok"}]}

    app.add_middleware(LoopbackOnlyAdapterApi)
    return app


def call(client_host: str, path: str) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=vllm_like_app(), client=(client_host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://predictor:8080") as client:
            return await client.post(path, json={"lora_name": "x", "lora_path": "/mnt/adapters/x"})

    return asyncio.run(post())


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1//load_lora_adapter",
                                  "/v1/load_lora_adapter/", "/V1/LOAD_LORA_ADAPTER"])
def test_other_pods_are_refused_the_adapter_api(path: str) -> None:
    response = call("10.4.2.7", path)
    assert response.status_code == 403
    assert "adapter agent" in response.json()["error"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_agent_in_the_pod_loads_and_unloads(host: str) -> None:
    assert (call(host, "/v1/load_lora_adapter")).text.startswith("Success")
    assert (call(host, "/v1/unload_lora_adapter")).status_code == 200


def test_inference_is_open_to_the_callers_the_network_policy_admits() -> None:
    assert (call("10.4.2.7", "/v1/completions")).json()["choices"][0]["text"] == "ok"


def test_the_configmap_module_imports_by_its_middleware_path_with_the_standard_library_only(tmp_path: Path) -> None:
    """What vLLM does with --middleware=tessera_adapter_guard.LoopbackOnlyAdapterApi, with the file
    the chart renders into its ConfigMap on PYTHONPATH."""
    docs = render()
    (configmap,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tessera-vllm-adapter-guard"]
    (tmp_path / "tessera_adapter_guard.py").write_text(configmap["data"]["tessera_adapter_guard.py"])
    probe = ("import importlib, sys; m = importlib.import_module('tessera_adapter_guard'); "
             "cls = getattr(m, 'LoopbackOnlyAdapterApi'); assert isinstance(cls, type); "
             "print(sorted(n for n in sys.modules if n.startswith(('tessera', 'fastapi', 'starlette'))))")
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                             + probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['tessera_adapter_guard']"
