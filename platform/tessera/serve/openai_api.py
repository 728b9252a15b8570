"""OpenAI-compatible completions, chat completions and models, and vLLM's adapter API.

Requests are validated by pydantic and refused in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), with the status codes the `openai` SDK maps
to its exceptions. Parameters the server does not implement are refused, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tessera.serve import metrics
from tessera.serve.adapters import AdapterError
from tessera.serve.engine import ChoiceDelta, EngineError
from tessera.serve.sampling import SamplingParams, TokenLogprob
from tessera.serve.service import ModelService, Usage

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                409: "invalid_request_error", 503: "service_unavailable", 500: "internal_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, error: EngineError | AdapterError) -> OpenAIError:
        param = "model" if error.code == "model_not_found" else None
        return cls(error.status, error.message, code=error.code, param=param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _openai_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, OpenAIError)
    return error_response(error)


async def _validation_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"] if p != "body")
        problems.append(f"{location}: {item['msg']}" if location else item["msg"])
    first = error.errors()[0]["loc"] if error.errors() else ()
    param = ".".join(str(p) for p in first if p != "body") or None
    return error_response(OpenAIError(400, "; ".join(problems), code="invalid_request", param=param))


async def _unexpected_error_handler(_: Request, error: Exception) -> JSONResponse:
    log.exception("request failed", exc_info=error)
    return error_response(OpenAIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)


# ---- requests ----


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Parameters completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS.")

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported by this server (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    best_of: int | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: None = None
    tool_choice: None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        for message in self.messages:
            message.text()  # refuses non-text content here, as a validation error
        return self


class LoadLoraRequest(BaseModel):
    """vLLM's body, plus Tessera's optional sha256 and task."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    task: str | None = None


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# ---- responses ----


def _token_text(service: ModelService, token_id: int) -> str:
    return service.tokenizer.decode([token_id])


def completion_logprobs(service: ModelService, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for item in logprobs:
        text = _token_text(service, item.token_id)
        tokens.append(text)
        token_logprobs.append(item.logprob)
        top.append({_token_text(service, t): lp for t, lp in item.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(service: ModelService, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(service, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [
        {**entry(item.token_id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
        for item in logprobs
    ]}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _merged(streams: list[AsyncIterator[list[ChoiceDelta]]]) -> AsyncIterator[tuple[int, list[ChoiceDelta]]]:
    """Events of several prompts' streams as they come, tagged with the prompt's position."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[list[ChoiceDelta]]) -> None:
        try:
            async for deltas in stream:
                await queue.put((position, deltas))
        except Exception as error:
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(tasks):
            item = await queue.get()
            if item is None:
                finished += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


class OpenAIRoutes:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    def _sampling(self, body: _SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
            logprobs=logprobs,
            ignore_eos=body.ignore_eos,
        )

    def _resolve(self, model: str, endpoint: str) -> str | None:
        try:
            return self.service.resolve(model)
        except EngineError as error:
            metrics.REQUESTS.labels("unknown", endpoint, str(error.status)).inc()
            raise OpenAIError.of(error) from None

    def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        tokenizer = self.service.tokenizer
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt", code="invalid_request")
        ids = []
        vocab = self.service.base.model.config.vocab_size
        for item in prompts:
            if isinstance(item, str):
                ids.append(tokenizer(item).input_ids)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                                      code="invalid_request")
                ids.append(list(item))
        if any(not p for p in ids):
            raise OpenAIError(400, "prompt must not be empty", param="prompt", code="invalid_request")
        return ids

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.service.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False).input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tokenizer(text).input_ids

    def _default_max_tokens(self, prompt_ids: list[list[int]]) -> int:
        return max(1, self.service.engine.max_model_len - max(len(p) for p in prompt_ids))

    async def completions(self, body: CompletionRequest):
        adapter = self._resolve(body.model, "completions")
        prompts = self._prompts(body)
        max_tokens = body.max_tokens or self._default_max_tokens(prompts)
        params = self._sampling(body, max_tokens, body.logprobs)
        created, response_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        usage = Usage()
        label = adapter or metrics.BASE_LABEL

        def choice(position: int, delta: ChoiceDelta, offset: int) -> dict[str, Any]:
            return {
                "index": position * body.n + delta.index,
                "text": delta.text,
                "logprobs": completion_logprobs(self.service, delta.logprobs, offset)
                if body.logprobs is not None else None,
                "finish_reason": delta.finish_reason,
            }

        if body.stream:
            streams = [self.service.generate(p, adapter, params, body.n, usage) for p in prompts]
            first = await self._first_or_error(streams, label, "completions")

            async def events() -> AsyncIterator[str]:
                offsets: dict[tuple[int, int], int] = {}
                async for position, deltas in first:
                    chunk_choices = []
                    for delta in deltas:
                        key = (position, delta.index)
                        chunk_choices.append(choice(position, delta, offsets.get(key, 0)))
                        offsets[key] = offsets.get(key, 0) + sum(
                            len(_token_text(self.service, t)) for t in delta.token_ids)
                    yield _sse({"id": response_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": chunk_choices})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": response_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [], "usage": usage.to_dict()})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        results = await self._gather(
            [self.service.complete(p, adapter, params, body.n, usage) for p in prompts], label, "completions")
        return {
            "id": response_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [choice(position, delta, 0) for position, deltas in enumerate(results) for delta in deltas],
            "usage": usage.to_dict(),
        }

    async def chat_completions(self, body: ChatCompletionRequest):
        adapter = self._resolve(body.model, "chat")
        prompt = self._chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens or self._default_max_tokens([prompt])
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self._sampling(body, max_tokens, top)
        created, response_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        usage = Usage()
        label = adapter or metrics.BASE_LABEL

        if body.stream:
            first = await self._first_or_error(
                [self.service.generate(prompt, adapter, params, body.n, usage)], label, "chat")

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                             "model": body.model, "choices": choices, **extra})

            async def events() -> AsyncIterator[str]:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(body.n)])
                async for _, deltas in first:
                    yield chunk([{
                        "index": d.index,
                        "delta": {"content": d.text} if d.text or not d.finish_reason else {},
                        "logprobs": chat_logprobs(self.service, d.logprobs) if body.logprobs else None,
                        "finish_reason": d.finish_reason,
                    } for d in deltas])
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage=usage.to_dict())
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        (choices,) = await self._gather([self.service.complete(prompt, adapter, params, body.n, usage)], label, "chat")
        return {
            "id": response_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(self.service, c.logprobs) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            } for c in choices],
            "usage": usage.to_dict(),
        }

    async def _gather(self, calls: list, label: str, endpoint: str) -> list:
        try:
            results = await asyncio.gather(*calls)
        except EngineError as error:
            metrics.REQUESTS.labels(label, endpoint, str(error.status)).inc()
            raise OpenAIError.of(error) from None
        metrics.REQUESTS.labels(label, endpoint, "200").inc()
        return results

    async def _first_or_error(self, streams: list, label: str, endpoint: str):
        """Start the streams and wait for their first event, so an early error is an HTTP error
        status rather than a broken event stream."""
        merged = _merged(streams)
        try:
            first = await merged.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineError as error:
            metrics.REQUESTS.labels(label, endpoint, str(error.status)).inc()
            raise OpenAIError.of(error) from None
        metrics.REQUESTS.labels(label, endpoint, "200").inc()

        async def replay() -> AsyncIterator[tuple[int, list[ChoiceDelta]]]:
            try:
                if first is not None:
                    yield first
                async for item in merged:
                    yield item
            finally:
                await merged.aclose()

        return replay()

    def _model_card(self, name: str) -> dict[str, Any]:
        record = self.service.registry.get(name)
        card = {"id": name, "object": "model", "created": self.service.created, "owned_by": "tessera",
                "root": name, "parent": None, "max_model_len": self.service.engine.max_model_len}
        if record is not None:
            card.update(root=record.source, parent=self.service.served_name, created=int(record.loaded_at),
                        rank=record.rank, task=record.task, sha256=record.sha256)
        return card

    async def list_models(self) -> dict[str, Any]:
        names = self.service.model_names()
        # `models` is KServe's v1 list, so one /v1/models answers both the openai SDK and KServe clients.
        return {"object": "list", "data": [self._model_card(n) for n in names], "models": names}

    async def get_model(self, model_name: str) -> dict[str, Any]:
        self._resolve(model_name, "models")
        return {**self._model_card(model_name), "name": model_name, "ready": True}

    async def load_lora_adapter(self, body: LoadLoraRequest):
        try:
            record = await self.service.registry.load(body.lora_name, body.lora_path, body.sha256, body.task)
        except AdapterError as error:
            raise OpenAIError(error.status, error.message, code=error.code, param="lora_path") from None
        return JSONResponse({
            "message": f"Success: LoRA adapter '{record.name}' added successfully.",
            "name": record.name, "sha256": record.sha256, "rank": record.rank,
        })

    async def unload_lora_adapter(self, body: UnloadLoraRequest):
        try:
            await self.service.registry.unload(body.lora_name)
        except AdapterError as error:
            raise OpenAIError(error.status, error.message, code=error.code, param="lora_name") from None
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})


def openai_router(service: ModelService) -> APIRouter:
    routes = OpenAIRoutes(service)
    router = APIRouter()
    for prefix in ("/v1", "/openai/v1"):
        router.add_api_route(f"{prefix}/completions", routes.completions, methods=["POST"], response_model=None)
        router.add_api_route(f"{prefix}/chat/completions", routes.chat_completions, methods=["POST"],
                             response_model=None)
        router.add_api_route(f"{prefix}/models", routes.list_models, methods=["GET"])
        # `path`: base model names have a slash (tessera/tiny-llama), as in OpenAI's own model ids.
        router.add_api_route(f"{prefix}/models/{{model_name:path}}", routes.get_model, methods=["GET"])
        router.add_api_route(f"{prefix}/load_lora_adapter", routes.load_lora_adapter, methods=["POST"],
                             response_model=None)
        router.add_api_route(f"{prefix}/unload_lora_adapter", routes.unload_lora_adapter, methods=["POST"],
                             response_model=None)
    return router
