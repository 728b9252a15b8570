"""The access middleware in vLLM, loaded the way the chart loads it: the files of the chart's
`tessera-vllm-access` ConfigMap as the package `tessera_access` on the path, the classes named by the
runtime's `--middleware` flags imported by those names and added with `app.add_middleware` in that
order (what vLLM's api_server does), settings from the runtime container's environment.

Stands in for vLLM (CUDA only, too large to carry here): a small FastAPI app shaped like vLLM's
OpenAI server: `/v1/models` (the base with `parent: null`, adapters with `root` = the agent's
`<adapters>/<name>/<sha256>` path), `/v1/completions` and `/v1/chat/completions` answering with
`usage`, streaming SSE with the usage chunk only when `stream_options.include_usage` asks for it,
the runtime adapter API and `/health`. The Kubernetes API is the operator tests' stand-in
(tests/operator/emulator.py, kmock) answering TokenReview and SubjectAccessReview by RBAC
(tests/access/reviews.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import sys
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tests.access.reviews import ROLE_BINDINGS, ROLES, service_account_user, start_reviewing_emulator
from tests.chart.helm import of_kind, render

BASE = "llama-8b"
SHA = "a" * 64
NAMESPACE = "desk"
TOKENS = {"tok-wealth": service_account_user(NAMESPACE, "wealth-app"),
          "tok-ops": {"username": "alice@bank.example", "groups": ["platform-ops", "system:authenticated"]}}


def vllm_like_app() -> FastAPI:
    app = FastAPI()
    adapters = {"wealth": f"/mnt/adapters/wealth/{SHA}", "trading": f"/mnt/adapters/trading/{'b' * 64}"}

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [{"id": BASE, "object": "model", "root": "/mnt/models", "parent": None}]
        cards += [{"id": name, "object": "model", "root": root, "parent": BASE} for name, root in adapters.items()]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load() -> PlainTextResponse:
        return PlainTextResponse("Success: LoRA adapter 'x' added successfully.")

    async def generate(request: Request, kind: str) -> Any:
        body = await request.json()
        if body.get("prompt") == "hold":  # a request kept in flight until the test lets it go
            request.app.state.entered.set()
            await request.app.state.gate.wait()
        if body.get("model") not in (BASE, *adapters):
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, status_code=404)
        n_out = int(body.get("max_tokens") or 4)
        usage = {"prompt_tokens": 7, "completion_tokens": n_out, "total_tokens": 7 + n_out}
        choice = ({"index": 0, "text": "ok ", "finish_reason": None} if kind == "text_completion"
                  else {"index": 0, "delta": {"content": "ok "}, "finish_reason": None})
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                for _ in range(n_out):
                    chunk = {"id": "c", "object": kind, "model": body["model"], "choices": [choice]}
                    if include:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
                if include:
                    yield f"data: {json.dumps({'id': 'c', 'object': kind, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        message = ({"text": "ok " * n_out} if kind == "text_completion"
                   else {"message": {"role": "assistant", "content": "ok " * n_out}})
        return {"id": "c", "object": kind, "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "finish_reason": "length", **message}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await generate(request, "chat.completion.chunk")

    return app


@pytest.fixture(scope="module")
def cluster():
    emulator = start_reviewing_emulator(TOKENS)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "wealth-user"},
            "rules": [{"apiGroups": ["tessera.dev"], "resources": ["adapters"], "resourceNames": ["wealth"],
                       "verbs": ["use"]}]}
    everything = {**role, "metadata": {"name": "every-model"}, "rules": [{**role["rules"][0], "resourceNames": []}]}
    bindings = [("wealth-user", {"kind": "ServiceAccount", "name": "wealth-app", "namespace": NAMESPACE}),
                ("every-model", {"kind": "Group", "name": "platform-ops", "apiGroup": "rbac.authorization.k8s.io"})]
    emulator.call(emulator.server.create(ROLES, NAMESPACE, role))
    emulator.call(emulator.server.create(ROLES, NAMESPACE, everything))
    for name, subject in bindings:
        emulator.call(emulator.server.create(ROLE_BINDINGS, NAMESPACE, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject]}))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def vllm(cluster, tmp_path, monkeypatch):
    """The stand-in app with the chart's middlewares, as vLLM builds it from the rendered runtime."""
    docs = render({"serving.vllm.enabled": True, "quotas.subjects": {"alice@bank.example": {"concurrentRequests": 1}}})
    (configmap,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tessera-vllm-access"]
    package = tmp_path / "site" / "tessera_access"
    package.mkdir(parents=True)
    for name, text in configmap["data"].items():
        (package / name).write_text(text)
    runtime = next(d for d in docs if d["kind"] == "ClusterServingRuntime" and d["metadata"]["name"] == "tessera-vllm")
    container = runtime["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["TESSERA_AUTH_MODE"] == "kubernetes"
    (quotas,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tessera-quotas"]
    (tmp_path / "quotas.json").write_text(quotas["data"]["quotas.json"])
    # In the pod: the API server from KUBERNETES_SERVICE_HOST, the namespace from the ServiceAccount mount.
    pod = {"TESSERA_QUOTAS": str(tmp_path / "quotas.json"), "TESSERA_KUBE_API": cluster.url,
           "TESSERA_AUTH_NAMESPACE": NAMESPACE, "TESSERA_AUDIT_FILE": str(tmp_path / "audit.jsonl")}
    for name, value in {**env, **pod}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for module in [m for m in sys.modules if m.startswith("tessera_access")]:
        monkeypatch.delitem(sys.modules, module)
    app = vllm_like_app()
    flags = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--middleware=")]
    for flag in flags:  # vllm/entrypoints/openai/api_server.py: build_app
        module_path, object_name = flag.rsplit(".", 1)
        app.add_middleware(getattr(importlib.import_module(module_path), object_name))
    assert sys.modules["tessera_access.middleware"].__file__.startswith(str(tmp_path))
    return app, tmp_path / "audit.jsonl"


def client(app: FastAPI, token: str, host: str = "10.2.3.4") -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app, client=(host, 41000))
    return openai.AsyncOpenAI(base_url="http://predictor:8080/v1", api_key=token, max_retries=0,
                              http_client=httpx.AsyncClient(transport=transport))


def test_vllm_routes_get_identity_authorization_and_audit(vllm):
    app, audit = vllm

    async def drive() -> dict[str, Any]:
        found: dict[str, Any] = {}
        with pytest.raises(openai.AuthenticationError):
            await client(app, "tok-unknown").completions.create(model="wealth", prompt="p", max_tokens=2)
        wealth = client(app, "tok-wealth")
        found["answer"] = await wealth.completions.create(model="wealth", prompt="What moved EUR/USD?", max_tokens=5)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await wealth.chat.completions.create(model="trading", messages=[{"role": "user", "content": "x"}])
        found["denied"] = denied.value.body
        found["listed"] = [m.id async for m in await wealth.models.list()]
        found["stream"] = [c async for c in await wealth.completions.create(model="wealth", prompt="p",
                                                                             max_tokens=3, stream=True)]
        found["ops"] = sorted([m.id async for m in await client(app, "tok-ops").models.list()])
        # The agent in the pod: loopback, no token; the adapter API and the full list stay its own.
        local = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5000)),
                                  base_url="http://127.0.0.1:8080")
        found["agent_list"] = (await local.get("/v1/models")).json()
        found["agent_load"] = (await local.post("/v1/load_lora_adapter", json={"lora_name": "x"})).status_code
        remote = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.2.3.4", 5000)),
                                   base_url="http://predictor:8080", headers={"Authorization": "Bearer tok-ops"})
        found["remote_load"] = (await remote.post("/v1/load_lora_adapter", json={"lora_name": "x"})).status_code
        found["health"] = (await remote.get("/health")).status_code
        # A body the middleware cannot read names no model it could check: refused, never passed on.
        found["form"] = (await remote.post("/v1/audio/transcriptions", data={"model": "trading"})).status_code
        return found

    found = asyncio.run(drive())
    assert found["answer"].usage.completion_tokens == 5
    assert found["denied"]["type"] == "permission_denied" and "trading" not in json.dumps(found["denied"])
    assert found["listed"] == ["wealth"]
    assert all(chunk.choices for chunk in found["stream"]) and len(found["stream"]) == 3
    assert found["ops"] == sorted([BASE, "wealth", "trading"])  # a group bound to every model
    assert {c["id"] for c in found["agent_list"]["data"]} == {BASE, "wealth", "trading"}
    assert found["agent_load"] == 200 and found["remote_load"] == 403 and found["health"] == 200
    assert found["form"] == 400

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["status"], line["decision"]) for line in lines] == [
        (401, "unauthenticated"), (200, "allowed"), (403, "denied"), (200, "allowed"), (200, "allowed"),
        (200, "allowed"), (400, "invalid")]
    completion, stream = lines[1], lines[4]
    assert completion["subject"] == f"system:serviceaccount:{NAMESPACE}:wealth-app"
    assert (completion["adapter"], completion["version"], completion["base"]) == ("wealth", SHA, BASE)
    assert (completion["tokens_in"], completion["tokens_out"]) == (7, 5)
    assert completion["prompt_sha256"] == hashlib.sha256(b"What moved EUR/USD?").hexdigest()
    assert (stream["tokens_in"], stream["tokens_out"]) == (7, 3)  # charged from the usage chunk it asked for
    assert "What moved" not in audit.read_text() and "tok-wealth" not in audit.read_text()


def test_vllm_concurrency_quota_answers_429_with_retry_after(vllm):
    """alice may have one request in flight (quotas from the chart's values): a second one, while the
    first is held, is refused with 429 and Retry-After; the first completes."""
    app, audit = vllm

    async def drive():
        app.state.entered, app.state.gate = asyncio.Event(), asyncio.Event()
        ops = client(app, "tok-ops")
        first = asyncio.create_task(ops.completions.create(model=BASE, prompt="hold", max_tokens=3))
        await app.state.entered.wait()  # the first request is now in flight
        with pytest.raises(openai.RateLimitError) as limited:
            await ops.completions.create(model=BASE, prompt="p", max_tokens=1)
        app.state.gate.set()
        return await first, limited.value

    first, limited = asyncio.run(drive())
    assert first.usage.completion_tokens == 3
    assert limited.response.headers["retry-after"] == "1"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["decision"], line["quota"]) for line in lines] == [("rate_limited", "concurrency"), ("allowed", None)]
    assert lines[1]["adapter"] is None and lines[1]["base"] == BASE
