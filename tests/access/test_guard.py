"""The adapter API guard (tessera/access/guard.py) vLLM loads with --middleware: the adapter agent in the
pod (loopback) may load and unload, any other caller gets 403, and every other path is untouched. The app it wraps
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
from tessera.access.guard import LoopbackOnlyAdapterApi

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


def test_the_configmap_package_imports_by_its_middleware_paths_without_tessera_or_fastapi(tmp_path: Path) -> None:
    """What vLLM does with --middleware=tessera_access.guard.LoopbackOnlyAdapterApi and
    --middleware=tessera_access.middleware.AccessControl, with the files the chart renders into its
    ConfigMap mounted as the directory tessera_access on PYTHONPATH."""
    docs = render()
    (configmap,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tessera-vllm-access"]
    package = tmp_path / "tessera_access"
    package.mkdir()
    for name, text in configmap["data"].items():
        (package / name).write_text(text)
    probe = ("import importlib, sys; "
             "classes = [getattr(importlib.import_module(m), c) for m, c in (('tessera_access.guard', "
             "'LoopbackOnlyAdapterApi'), ('tessera_access.middleware', 'AccessControl'))]; "
             "assert all(isinstance(c, type) for c in classes); "
             "print(sorted(n for n in sys.modules if n.startswith(('tessera', 'fastapi', 'starlette', 'kubernetes'))))")
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                             + probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("['tessera_access'") and "fastapi" not in result.stdout
    assert "'tessera'" not in result.stdout and "kubernetes" not in result.stdout
