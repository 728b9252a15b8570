"""The agent's HTTP server (aiohttp, which the operator image carries with kopf): vLLM's adapter API,
the runtime's model list as the operator reads it, and a health endpoint.

Every refusal is one JSON body in the OpenAI error shape, `{"error": {"message", "type", "code"}}`,
with the status the operator acts on: 4xx the adapter is at fault (retrying will not help), 5xx the
store or the runtime is (it will be retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera.adapter_format.runtime import LLAMA_TARGET_MODULES, RuntimeKind, RuntimeProfile
from tessera.agent.agent import AdapterAgent, LoadRequest, UnloadRequest
from tessera.agent.rules import AgentError
from tessera.api.tenancy import DEFAULT_SHARED_PREFIXES, TenancyRules

log = logging.getLogger(__name__)
AGENT_KEY = web.AppKey("agent", AdapterAgent)


class AgentSettings(BaseModel):
    """`tessera adapter-agent`'s options (the chart derives them from the runtime's values)."""

    model_config = ConfigDict(frozen=True)

    runtime: RuntimeKind
    runtime_url: str = Field("http://127.0.0.1:8080", pattern=r"^https?://")
    adapters_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(8085, ge=1, le=65535)
    max_lora_rank: int = Field(64, ge=1)
    base_model: str | None = None
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_TARGET_MODULES), min_length=1)
    allowed_prefixes: list[str] = Field(default_factory=list)
    # Tenancy: the pod's namespace (the downward API) and the store roots tenants share. With both,
    # adapters may come only from that namespace's prefixes or the shared read-only ones
    # (tessera.api.tenancy), whatever allowed_prefixes says: a predictor never serves another team's.
    namespace: str | None = None
    store_roots: list[str] = Field(default_factory=list)
    shared_prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_SHARED_PREFIXES))
    resync_seconds: float = Field(5.0, gt=0)

    def prefixes(self) -> list[str]:
        """Where adapters may come from."""
        if self.namespace and self.store_roots:
            rules = TenancyRules(tuple(self.store_roots), tuple(self.shared_prefixes))
            return rules.readable_prefixes(self.namespace)
        return self.allowed_prefixes

    def profile(self) -> RuntimeProfile:
        return RuntimeProfile(self.runtime, self.max_lora_rank, self.base_model, frozenset(self.target_modules))


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    kind = "NotFoundError" if status == 404 else "BadRequestError" if status < 500 else "ServiceUnavailableError"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


async def _body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    try:
        data = await request.json()
    except ValueError:
        raise AgentError("the request body is not JSON", code="invalid_request") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
        raise AgentError(problems, code="invalid_request") from None


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except AgentError as error:
        log.warning("%s %s refused (%s): %s", request.method, request.path, error.code, error.message)
        return _error(error.status, error.message, error.code)


async def load(request: web.Request) -> web.Response:
    body = await _body(request, LoadRequest)
    held = await request.app[AGENT_KEY].load(body)
    return web.json_response({"message": f"Success: LoRA adapter '{held.name}' added successfully.",
                              "name": held.name, "sha256": held.sha256, "rank": held.rank})


async def unload(request: web.Request) -> web.Response:
    body = await _body(request, UnloadRequest)
    await request.app[AGENT_KEY].unload(body.lora_name)
    return web.json_response({"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})


async def models(request: web.Request) -> web.Response:
    return web.json_response(await request.app[AGENT_KEY].models())


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].status())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(agent: AdapterAgent, resync_seconds: float) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 << 10)
    app[AGENT_KEY] = agent
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/agent/status", status)
    app.router.add_get("/healthz", health)

    async def resync(app: web.Application):
        task = asyncio.create_task(agent.resync_forever(resync_seconds))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.client.aclose()

    app.cleanup_ctx.append(resync)
    return app


def run(settings: AgentSettings) -> None:
    agent = AdapterAgent(settings.profile(), settings.runtime_url, settings.adapters_dir,
                         allowed_prefixes=settings.prefixes())
    log.info("adapter agent for the %s runtime at %s: %d adapter(s) held in %s", settings.runtime,
             settings.runtime_url, len(agent.held), settings.adapters_dir)
    web.run_app(build_app(agent, settings.resync_seconds), host=settings.host, port=settings.port,
                print=None, access_log=None)
