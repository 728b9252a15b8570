"""The server: one FastAPI app on uvicorn with OpenAI, vLLM-adapter and KServe v1/v2 routes.

Why not `kserve.ModelServer`: it parses the process's argv at import, starts a gRPC server and
installs its own signal handlers, and its OpenAI routes need vLLM. Tessera uses KServe where it
fits (its `Model`, `ModelRepository`, data plane, v1/v2 routes and error handlers) on an app it
owns, served by the same uvicorn, listening on 8080 as a KServe predictor must. The model itself
is driven by `tessera.serve.runtime.engine`, a batching thread, not by request handlers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tessera.access.middleware import AccessControl
from tessera.access.settings import AccessPolicy
from tessera.errors import InvalidSpecError
from tessera.serve.settings import ServeSettings

if TYPE_CHECKING:  # imported when the server is built: it brings torch
    from tessera.serve.runtime.service import ModelService

log = logging.getLogger(__name__)


@dataclass
class Server:
    app: FastAPI
    service: ModelService
    settings: ServeSettings


def build_server(settings: ServeSettings) -> Server:
    """Load the base model and assemble the app; the engine starts with the app's lifespan."""
    from tessera.serve.http import kserve_api
    from tessera.serve.http.admin import admin_router
    from tessera.serve.http.errors import install_error_handlers, limit_body_size
    from tessera.serve.http.openai_api import openai_router
    from tessera.serve.http.request_path import RequestPath
    from tessera.serve.runtime.adapters import AdapterError, ServedBase
    from tessera.serve.runtime.base_model import load_base
    from tessera.serve.runtime.engine import Engine
    from tessera.serve.runtime.lora import LoraSlots
    from tessera.serve.runtime.registry import AdapterRegistry
    from tessera.serve.runtime.service import ModelService, RequestLimits

    # Who may call which model, built before the model loads: a bad keys or quota file stops the start.
    try:
        access_policy = AccessPolicy.build(settings.access_settings(settings.served_model_name))
    except ValueError as error:  # a bad keys or quota file; kubernetes mode outside a pod without --kube-api-url
        raise InvalidSpecError([str(error)], source="tessera serve") from None
    # A cache directory of our own (no --cache-dir) holds a downloaded base model: removed at exit.
    own_cache = settings.cache_dir is None
    cache_dir = settings.cache_dir or Path(tempfile.mkdtemp(prefix="tessera-serve-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        base = load_base(
            settings.model,
            cache_dir=cache_dir,
            quantization=settings.quantization,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            threads=settings.cpu_threads,
        )
    except BaseException:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    served_name = settings.served_model_name or base.name or base.directory.name
    access_policy.base = served_name
    spec = ServedBase.of(base.model, base.name)
    lora = LoraSlots(base.model, settings.max_loras + 1, base.dtype, base.device)
    registry = AdapterRegistry(
        lambda reloader: Engine(
            base.model,
            base.tokenizer,
            lora,
            max_batch_size=settings.max_batch_size,
            max_wait=settings.max_wait_ms / 1000,
            max_model_len=base.max_model_len,
            eos_token_ids=base.eos_token_ids,
            reloader=reloader,
        ),
        spec, max_rank=settings.max_lora_rank, allowed_prefixes=settings.allowed_prefixes, cache_dir=cache_dir,
    )
    engine = registry.engine
    limits = RequestLimits(max_request_bytes=settings.max_request_bytes, max_prompts=settings.max_prompts,
                           max_prompt_tokens=settings.max_prompt_tokens, max_request_tokens=settings.max_request_tokens,
                           max_response_bytes=settings.max_response_bytes)
    service = ModelService(base, engine, registry, served_name, limits)

    async def load_startup_adapters() -> None:
        # A bad entry or file is logged and skipped: a replica that never became ready because of
        # one adapter would take every other adapter down with it.
        if settings.adapters_file is not None and settings.adapters_file.exists():
            try:
                for name, problem in await registry.load_file(settings.adapters_file):
                    if problem:
                        log.error("start-up adapter %s not loaded: %s", name, problem)
            except AdapterError as error:
                log.error("%s", error.message)
        elif settings.adapters_file is not None:
            log.warning("adapters file %s does not exist: starting without adapters", settings.adapters_file)
        service.ready = True
        log.info("ready: serving %s with adapters %s", served_name, ", ".join(registry.records) or "(none)")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        task = asyncio.create_task(load_startup_adapters())
        try:
            yield
        finally:
            task.cancel()
            registry.close()
            service.close()
            engine.stop()
            if own_cache:
                shutil.rmtree(cache_dir, ignore_errors=True)

    app = FastAPI(title="Tessera model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    # Middlewares, innermost first: who may call what (identity, quota, audit), the body limit (outside the
    # access check, which reads the body for the model's name: a declared oversize body is refused unread),
    # the one request path (id, timing, counter) that every request passes, then the adapter API's guard,
    # outermost so a refused caller's body is never read.
    app.add_middleware(AccessControl, policy=access_policy)
    app.add_middleware(limit_body_size, max_bytes=limits.max_request_bytes)
    app.add_middleware(RequestPath, label_of=service.metric_label)
    if settings.adapter_api_loopback_only:
        from tessera.access.guard import LoopbackOnlyAdapterApi

        app.add_middleware(LoopbackOnlyAdapterApi)
    app.include_router(openai_router(service))
    app.include_router(admin_router(service))
    kserve_api.mount_kserve(app, service)

    async def metrics_endpoint() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def health() -> Response:
        return Response(status_code=200 if engine.alive else 503)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return Server(app=app, service=service, settings=settings)


def serve(settings: ServeSettings) -> None:
    import uvicorn

    from tessera.serve.http.connections import bounded_protocol, connection_cap

    server = build_server(settings)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    # uvicorn's own keep-alive timeout; a whole-request read deadline and a connection cap on its protocol.
    uvicorn.run(server.app, host=settings.host, port=settings.port, log_level="warning",
                timeout_keep_alive=settings.keep_alive_timeout,
                http=bounded_protocol(settings.read_timeout, connection_cap(settings.max_connections)))
