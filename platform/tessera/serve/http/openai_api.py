"""OpenAI-compatible completions, chat completions and models (vLLM's adapter API is in `admin`).

Requests are validated by pydantic and refused as `ServeError`s, which `tessera.serve.http.errors`
answers in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) with the status
codes the `openai` SDK maps to its exceptions. Parameters the server does not implement are
refused, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tessera.serve import metrics
from tessera.serve.errors import ServeError
from tessera.serve.runtime.engine import ChoiceDelta
from tessera.serve.runtime.sampling import SamplingParams, TokenLogprob
from tessera.serve.runtime.service import ModelService, Usage, check_budget, unicode_problem

log = logging.getLogger(__name__)

T = TypeVar("T")
DISCONNECT_POLL_SECONDS = 0.5


def _unicode(value: str) -> str:
    problem = unicode_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# Any text a request carries: a lone surrogate is refused at parsing, before it can reach a tokenizer or a response.
Text = Annotated[str, AfterValidator(_unicode)]


# ---- requests ----


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Parameters completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS.")

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: Text | list[Text] | None) -> Text | list[Text] | None:
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
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only (as vLLM).")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")
    best_of: int | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: set echo to score the prompt")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(_unicode(str(part.get("text", ""))))
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


# ---- responses ----


def _token_text(service: ModelService, token_id: int) -> str:
    return service.tokenizer.decode([token_id])


def completion_logprobs(service: ModelService, entries: list[tuple[int, TokenLogprob | None]],
                        offset: int) -> dict[str, Any]:
    """OpenAI's completion logprobs of (token id, its logprob or None) entries; as vLLM's, each
    `top_logprobs` holds the token itself beside the top k (so k = 0 still names it)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, item in entries:
        text = _token_text(service, token_id)
        tokens.append(text)
        token_logprobs.append(None if item is None else item.logprob)
        if item is None:
            top.append(None)
        else:
            alternatives = {_token_text(service, t): lp for t, lp in item.top}
            alternatives.setdefault(text, item.logprob)
            top.append(alternatives)
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


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first: an abandoned request's rows leave
    the batch instead of generating for no one."""
    task = asyncio.ensure_future(work)
    # A cancelled gather ends with CancelledError as its exception: taken here, never logged as unretrieved.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ServeError("the client closed the connection", status=499, code="client_closed_request")
    finally:
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
        except ServeError as error:
            metrics.REQUESTS.labels("unknown", endpoint, str(error.status)).inc()
            raise

    async def _prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        """Each prompt's token ids, and its text where the request gave text."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise ServeError("prompt must not be empty", param="prompt")
        if len(prompts) > self.service.limits.max_prompts:
            raise ServeError(f"at most {self.service.limits.max_prompts} prompts in one request (got {len(prompts)})",
                             code="too_many_prompts", param="prompt")
        vocab = self.service.base.model.config.vocab_size
        texts = [item for item in prompts if isinstance(item, str)]
        encoded = iter(await self.service.encode(texts, "prompt"))
        ids = []
        for item in prompts:
            if isinstance(item, str):
                ids.append(next(encoded))
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids.append(list(item))
        if any(not p for p in ids):
            raise ServeError("prompt must not be empty", param="prompt")
        return ids, [item if isinstance(item, str) else None for item in prompts]

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.service.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for position, message in enumerate(messages):
            self.service.check_text(message["content"], f"messages.{position}.content")

        def encode() -> list[int]:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return tokenizer(text, add_special_tokens=False).input_ids
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return tokenizer(text).input_ids

        return await self.service.tokenize(encode)

    def _max_tokens(self, requested: int | None, prompt_ids: list[list[int]], n: int) -> int:
        """The request's max_tokens (default: what the context leaves), within the request budget."""
        max_tokens = requested if requested is not None else max(
            1, self.service.engine.max_model_len - max(len(p) for p in prompt_ids))
        check_budget(self.service.limits, len(prompt_ids), n, max_tokens)
        return max_tokens

    async def completions(self, body: CompletionRequest, request: Request):
        adapter = self._resolve(body.model, "completions")
        prompts, prompt_texts = await self._prompts(body)
        max_tokens = self._max_tokens(body.max_tokens, prompts, body.n)
        params = self._sampling(body, max_tokens, body.logprobs)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        created, response_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        usage = Usage()
        label = adapter or metrics.BASE_LABEL

        def choice(position: int, delta: ChoiceDelta, offset: int, first: bool) -> dict[str, Any]:
            """One choice (or its chunk); `first`: the choice's first, which carries the echoed prompt."""
            text = delta.text
            entries: list[tuple[int, TokenLogprob | None]] = list(zip(delta.token_ids, delta.logprobs, strict=False))
            if body.echo and first:
                prompt_ids = prompts[position]
                echoed = prompt_texts[position]
                text = (echoed if echoed is not None else self.service.tokenizer.decode(prompt_ids)) + text
                entries = [*zip(prompt_ids, delta.prompt_logprobs or [None] * len(prompt_ids), strict=True),
                           *entries]
            return {
                "index": position * body.n + delta.index,
                "text": text,
                "logprobs": completion_logprobs(self.service, entries, offset) if body.logprobs is not None else None,
                "finish_reason": delta.finish_reason,
            }

        def chunk(choices: list[dict[str, Any]], usage_now: dict[str, int] | None = None) -> str:
            payload = {"id": response_id, "object": "text_completion", "created": created, "model": body.model,
                       "choices": choices}
            if body.stream_options and body.stream_options.include_usage:
                payload["usage"] = usage_now  # null on every chunk but the last, as OpenAI sends it
            return _sse(payload)

        if body.stream:
            streams = [self.service.generate(p, adapter, params, body.n, usage, scored) for p in prompts]
            first = await self._first_or_error(streams, label, "completions")

            async def events() -> AsyncIterator[str]:
                offsets: dict[tuple[int, int], int] = {}
                async for position, deltas in first:
                    chunk_choices = []
                    for delta in deltas:
                        key = (position, delta.index)
                        item = choice(position, delta, offsets.get(key, 0), key not in offsets)
                        chunk_choices.append(item)
                        offsets[key] = offsets.get(key, 0) + (
                            sum(len(t) for t in item["logprobs"]["tokens"]) if item["logprobs"] else len(item["text"]))
                    yield chunk(chunk_choices)
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage.to_dict())
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        results = await self._gather(
            request, [self.service.complete(p, adapter, params, body.n, usage, scored) for p in prompts],
            label, "completions")
        return {
            "id": response_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [choice(position, delta, 0, True)
                        for position, deltas in enumerate(results) for delta in deltas],
            "usage": usage.to_dict(),
        }

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        adapter = self._resolve(body.model, "chat")
        prompt = await self._chat_prompt(body)
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens, [prompt], body.n)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self._sampling(body, max_tokens, top)
        created, response_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        usage = Usage()
        label = adapter or metrics.BASE_LABEL

        if body.stream:
            first = await self._first_or_error(
                [self.service.generate(prompt, adapter, params, body.n, usage)], label, "chat")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], usage_now: dict[str, int] | None = None) -> str:
                payload = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                           "model": body.model, "choices": choices}
                if include_usage:
                    payload["usage"] = usage_now  # null on every chunk but the last, as OpenAI sends it
                return _sse(payload)

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
                if include_usage:
                    yield chunk([], usage.to_dict())
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        (choices,) = await self._gather(
            request, [self.service.complete(prompt, adapter, params, body.n, usage)], label, "chat")
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

    async def _gather(self, request: Request, calls: list, label: str, endpoint: str) -> list:
        try:
            results = await cancel_on_disconnect(request, asyncio.gather(*calls))
        except ServeError as error:
            metrics.REQUESTS.labels(label, endpoint, str(error.status)).inc()
            raise
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
        except ServeError as error:
            metrics.REQUESTS.labels(label, endpoint, str(error.status)).inc()
            raise
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
                        rank=record.rank, task=record.task, sha256=record.sha256, lora_int_id=record.int_id)
        return card

    async def list_models(self) -> dict[str, Any]:
        names = self.service.model_names()
        # `models` is KServe's v1 list, so one /v1/models answers both the openai SDK and KServe clients.
        return {"object": "list", "data": [self._model_card(n) for n in names], "models": self.service.kserve_names()}

    async def get_model(self, model_name: str) -> dict[str, Any]:
        self._resolve(model_name, "models")
        return {**self._model_card(model_name), "name": model_name, "ready": True}


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
    return router
