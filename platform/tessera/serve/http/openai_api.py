"""OpenAI-compatible completions, chat completions and models (vLLM's adapter API is in `admin`).

Every inference route is parse -> generate -> render: the request is validated by pydantic, its
prompts tokenized within the request's budget and the whole cost checked (`service.check_budget`)
before the engine sees it; the answer is built as pydantic response models and serialized off the
event loop; streams of both routes are written by the one chunk builder (`ResponseHead.chunk`).
Refusals are `ServeError`s, which `tessera.serve.http.errors` answers in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) with the status codes the `openai` SDK maps to
its exceptions. Parameters the server does not implement are refused, never silently ignored.
Request ids, timing and the request counter are `request_path`'s, in front of every route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tessera.serve.errors import ServeError
from tessera.serve.http.request_path import name_model
from tessera.serve.runtime.engine import ChoiceDelta
from tessera.serve.runtime.sampling import MAX_STOP_CHARS, MAX_STOPS, SamplingParams, TokenLogprob
from tessera.serve.runtime.service import ModelService, RequestCost, Usage, check_budget, unicode_problem

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
    def _bounded_stops(cls, value: Text | list[Text] | None) -> Text | list[Text] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
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


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(**usage.to_dict())


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role", "content"} first, then {"content"}, and {} with the finish reason
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class Chunk(BaseModel):
    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[CompletionChoice] | list[ChatChunkChoice]
    usage: UsageInfo | None = None  # with include_usage: null on every chunk but the last, as OpenAI sends it


@dataclass(frozen=True)
class ResponseHead:
    """What every answer (or chunk) of one request repeats; `chunk` is the one chunk builder."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def chunk(self, kind: Literal["text_completion", "chat.completion.chunk"],
              choices: list[CompletionChoice] | list[ChatChunkChoice], usage: Usage | None = None) -> str:
        payload = Chunk(id=self.id, object=kind, created=self.created, model=self.model, choices=choices,
                        usage=UsageInfo.of(usage) if usage is not None else None)
        return f"data: {payload.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"


def completion_logprobs(token_texts: list[str], entries: list[tuple[int, TokenLogprob | None]],
                        offset: int) -> CompletionLogprobs:
    """OpenAI's completion logprobs of (token id, its logprob or None) entries; as vLLM's, each
    `top_logprobs` holds the token itself beside the top k (so k = 0 still names it)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, item in entries:
        text = token_texts[token_id]
        tokens.append(text)
        token_logprobs.append(None if item is None else item.logprob)
        if item is None:
            top.append(None)
        else:
            alternatives = {token_texts[t]: lp for t, lp in item.top}
            alternatives.setdefault(text, item.logprob)
            top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


def chat_logprobs(token_texts: list[str], logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_texts[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(item.token_id, item.logprob), top_logprobs=[entry(t, lp) for t, lp in item.top])
        for item in logprobs
    ])


@dataclass
class CompletionRenderer:
    """Completion choices from engine deltas: the echoed prompt on a choice's first, logprobs, text
    offsets carried across a stream's chunks."""

    service: ModelService
    body: CompletionRequest
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    offsets: dict[tuple[int, int], int] = field(default_factory=dict)

    def choice(self, position: int, delta: ChoiceDelta) -> CompletionChoice:
        key = (position, delta.index)
        first = key not in self.offsets
        text = delta.text
        entries: list[tuple[int, TokenLogprob | None]] = list(zip(delta.token_ids, delta.logprobs, strict=False))
        if self.body.echo and first:
            prompt_ids = self.prompts[position]
            echoed = self.prompt_texts[position]
            text = (echoed if echoed is not None else self.service.tokenizer.decode(prompt_ids)) + text
            entries = [*zip(prompt_ids, delta.prompt_logprobs or [None] * len(prompt_ids), strict=True), *entries]
        logprobs = (completion_logprobs(self.service.token_texts, entries, self.offsets.get(key, 0))
                    if self.body.logprobs is not None else None)
        self.offsets[key] = self.offsets.get(key, 0) + (
            sum(len(t) for t in logprobs.tokens) if logprobs else len(text))
        return CompletionChoice(index=position * self.body.n + delta.index, text=text, logprobs=logprobs,
                                finish_reason=delta.finish_reason)

    def chunk_choices(self, position: int, deltas: list[ChoiceDelta]) -> list[CompletionChoice]:
        return [self.choice(position, delta) for delta in deltas]


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


async def _json(build: Callable[[], BaseModel]) -> Response:
    """The answer built and serialized on a worker thread: a large one (logprobs of long prompts)
    never holds the event loop, and so never the other clients."""
    body = await asyncio.to_thread(lambda: build().model_dump_json())
    return Response(content=body, media_type="application/json")


class OpenAIRoutes:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    # ---- parse ----

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

    def _resolve(self, request: Request, model: str) -> str | None:
        name_model(request.scope, model)
        return self.service.resolve(model)

    def _head(self, request: Request, prefix: str, body: _SamplingRequest) -> ResponseHead:
        return ResponseHead(id=f"{prefix}-{request.state.request_id}", created=int(time.time()), model=body.model,
                            include_usage=bool(body.stream_options and body.stream_options.include_usage))

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
        limits = self.service.limits
        if len(prompts) > limits.max_prompts:
            raise ServeError(f"at most {limits.max_prompts} prompts in one request (got {len(prompts)}; "
                             "tessera serve --max-prompts)", code="too_many_prompts", param="prompt")
        vocab = self.service.base.model.config.vocab_size
        given_ids = [item for item in prompts if not isinstance(item, str)]
        for item in given_ids:
            if any(not 0 <= t < vocab for t in item):
                raise ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        texts = [item for item in prompts if isinstance(item, str)]
        encoded = iter(await self.service.encode(texts, "prompt", known_tokens=sum(map(len, given_ids))))
        ids = [next(encoded) if isinstance(item, str) else list(item) for item in prompts]
        if any(not p for p in ids):
            raise ServeError("prompt must not be empty", param="prompt")
        return ids, [item if isinstance(item, str) else None for item in prompts]

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.service.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for position, message in enumerate(messages):
            self.service.check_text(message["content"], f"messages.{position}.content")
        # All messages make one prompt: together they must fit one context, checked before tokenizing.
        self.service.check_prompt_texts(["".join(m["content"] for m in messages)], "messages")

        def encode() -> list[int]:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return tokenizer(text, add_special_tokens=False).input_ids
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return tokenizer(text).input_ids

        (prompt,) = await self.service.encode_each([encode], "messages")
        return prompt

    def _max_tokens(self, requested: int | None, prompt_ids: list[list[int]]) -> int:
        """The request's max_tokens; by default what the context leaves."""
        if requested is not None:
            return requested
        return max(1, self.service.engine.max_model_len - max(len(p) for p in prompt_ids))

    # ---- the routes ----

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        adapter = self._resolve(request, body.model)
        prompts, prompt_texts = await self._prompts(body)
        max_tokens = self._max_tokens(body.max_tokens, prompts)
        check_budget(self.service.limits, RequestCost(
            prompts=len(prompts), prompt_tokens=sum(map(len, prompts)), n=body.n, max_tokens=max_tokens,
            echoed_tokens=sum(map(len, prompts)) if body.echo else 0, logprobs=body.logprobs))
        params = self._sampling(body, max_tokens, body.logprobs)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        head = self._head(request, "cmpl", body)
        renderer = CompletionRenderer(self.service, body, prompts, prompt_texts)
        usage = Usage()
        if body.stream:
            streams = [self.service.generate(p, adapter, params, body.n, usage, scored) for p in prompts]
            return await self._stream(streams, usage, lambda position, deltas: head.chunk(
                "text_completion", renderer.chunk_choices(position, deltas)), head, "text_completion",
                offload=body.logprobs is not None)
        results = await cancel_on_disconnect(request, asyncio.gather(
            *(self.service.complete(p, adapter, params, body.n, usage, scored) for p in prompts)))
        return await _json(lambda: Completion(
            id=head.id, created=head.created, model=head.model, usage=UsageInfo.of(usage),
            choices=[renderer.choice(position, delta) for position, deltas in enumerate(results) for delta in deltas]))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        adapter = self._resolve(request, body.model)
        prompt = await self._chat_prompt(body)
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens, [prompt])
        top = (body.top_logprobs or 0) if body.logprobs else None
        check_budget(self.service.limits, RequestCost(prompts=1, prompt_tokens=len(prompt), n=body.n,
                                                      max_tokens=max_tokens, logprobs=top))
        params = self._sampling(body, max_tokens, top)
        head = self._head(request, "chatcmpl", body)
        texts = self.service.token_texts
        usage = Usage()

        def logprobs(items: list[TokenLogprob]) -> ChatLogprobs | None:
            return chat_logprobs(texts, items) if body.logprobs else None

        if body.stream:
            opening = head.chunk("chat.completion.chunk", [
                ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
                for i in range(body.n)])
            return await self._stream(
                [self.service.generate(prompt, adapter, params, body.n, usage)], usage,
                lambda _, deltas: head.chunk("chat.completion.chunk", [ChatChunkChoice(
                    index=d.index, delta={"content": d.text} if d.text or not d.finish_reason else {},
                    logprobs=logprobs(d.logprobs), finish_reason=d.finish_reason) for d in deltas]),
                head, "chat.completion.chunk", opening=opening, offload=body.logprobs)
        (choices,) = await cancel_on_disconnect(request, asyncio.gather(
            self.service.complete(prompt, adapter, params, body.n, usage)))
        return await _json(lambda: ChatCompletion(
            id=head.id, created=head.created, model=head.model, usage=UsageInfo.of(usage),
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=logprobs(c.logprobs),
                                finish_reason=c.finish_reason) for c in choices]))

    # ---- generate and render a stream ----

    async def _stream(self, streams: list[AsyncIterator[list[ChoiceDelta]]], usage: Usage,
                      render: Callable[[int, list[ChoiceDelta]], str], head: ResponseHead,
                      kind: Literal["text_completion", "chat.completion.chunk"], *, opening: str | None = None,
                      offload: bool = False) -> StreamingResponse:
        """Start the streams and wait for their first event, so an early error is an HTTP error status
        rather than a broken event stream; then one chunk per engine step. `offload`: chunks with
        logprobs are rendered on a worker thread."""
        merged = _merged(streams)
        try:
            first = await merged.__anext__()
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[str]:
            try:
                if opening is not None:
                    yield opening
                pending = [] if first is None else [first]
                async for item in _chain(pending, merged):
                    yield await asyncio.to_thread(render, *item) if offload else render(*item)
                if head.include_usage:
                    yield head.chunk(kind, [], usage)
                yield "data: [DONE]\n\n"
            finally:
                await merged.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- models ----

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
        self.service.resolve(model_name)
        return {**self._model_card(model_name), "name": model_name, "ready": True}


async def _chain(first: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in first:
        yield item
    async for item in rest:
        yield item


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
