"""What the HTTP layers share: name resolution, bounded tokenization off the event loop, request
budgets, and generation as an async stream of deltas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from tessera.access import usage as access_usage
from tessera.serve import metrics
from tessera.serve.errors import ServeError, model_not_found
from tessera.serve.runtime.base_model import LoadedBase
from tessera.serve.runtime.engine import ChoiceDelta, Engine, GenerationRequest
from tessera.serve.runtime.registry import AdapterRegistry
from tessera.serve.runtime.sampling import SamplingParams

T = TypeVar("T")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, so no request can take the server's memory or time from others."""

    max_request_bytes: int = 4 << 20  # the body, before anything parses it
    max_prompts: int = 64  # prompts in one completions request
    max_request_tokens: int = 65536  # prompts x n x max_tokens: tokens one request may make the engine generate


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode, None when it is: JSON allows a lone surrogate (`\\ud800`);
    UTF-8, tokenizers and responses do not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"not valid Unicode: a lone surrogate (\\u{ord(text[error.start]):04x}) at character {error.start}"
    return None


def valid_unicode(text: str, param: str) -> str:
    problem = unicode_problem(text)
    if problem:
        raise ServeError(f"{param} is {problem}", code="invalid_unicode", param=param)
    return text


def check_budget(limits: RequestLimits, prompts: int, n: int, max_tokens: int) -> None:
    if prompts > limits.max_prompts:
        raise ServeError(f"at most {limits.max_prompts} prompts in one request (got {prompts})",
                         code="too_many_prompts", param="prompt")
    if prompts * n * max_tokens > limits.max_request_tokens:
        raise ServeError(
            f"this request could generate {prompts * n * max_tokens} tokens ({prompts} prompt(s) x n={n} x "
            f"max_tokens={max_tokens}); at most {limits.max_request_tokens} per request: lower n or max_tokens",
            code="request_too_large", param="max_tokens")


class _RequestStream:
    """Carries one request's events from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def sink(self, event: list[ChoiceDelta] | BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    async def events(self) -> AsyncIterator[list[ChoiceDelta]]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ModelService:
    """One base model and its adapters, under the names clients use in `model`."""

    def __init__(self, base: LoadedBase, engine: Engine, registry: AdapterRegistry, served_name: str,
                 limits: RequestLimits | None = None) -> None:
        self.base = base
        self.engine = engine
        self.registry = registry
        self.served_name = served_name  # the base's name on the OpenAI routes (its upstream name, slash and all)
        # KServe's routes cannot address a slash (`/v2/models/{name}/infer`): there the base is the last part.
        self.kserve_name = served_name.rsplit("/", 1)[-1]
        self.limits = limits or RequestLimits()
        self.created = int(time.time())
        self.ready = False  # set once the start-up adapters were loaded
        # One thread: tokenizing a long text never stalls the event loop, and the tokenizer is never
        # used by two requests at once.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-tokenizer")
        # No token is longer than the longest vocabulary entry, so a text longer than the context
        # times that cannot fit: refused before it is tokenized.
        longest = max((len(t) for t in self.tokenizer.convert_ids_to_tokens(range(len(self.tokenizer)))
                       if isinstance(t, str)), default=1)
        self.max_text_chars = engine.max_model_len * max(longest, 1)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def resolve(self, model: str) -> str | None:
        """The adapter `model` names, None for the base model; 404 in OpenAI's words otherwise."""
        if model in (self.served_name, self.kserve_name):
            return None
        if self.registry.get(model) is not None:
            return model
        raise model_not_found(model)

    def check_text(self, text: str, param: str) -> str:
        valid_unicode(text, param)
        if len(text) > self.max_text_chars:
            raise ServeError(
                f"{param} is {len(text)} characters long: more than this model's maximum context length of "
                f"{self.engine.max_model_len} tokens can hold. Please shorten it.",
                code="context_length_exceeded", param=param)
        return text

    async def tokenize(self, work: Callable[[], T]) -> T:
        """Run `work` (which uses the tokenizer) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work)

    async def encode(self, texts: list[str], param: str) -> list[list[int]]:
        """Token ids of each text, with the tokenizer's special tokens, after the checks above."""
        for text in texts:
            self.check_text(text, param)
        return await self.tokenize(lambda: [self.tokenizer(text).input_ids for text in texts])

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def model_names(self) -> list[str]:
        return [self.served_name, *self.registry.records]

    def kserve_names(self) -> list[str]:
        return [self.kserve_name, *self.registry.records]

    async def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, n: int, usage: Usage,
        prompt_logprobs: int | None = None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Deltas of the `n` choices for one prompt as the engine produces them (with the prompt's own
        logprobs on each choice's first delta if `prompt_logprobs` is set).

        If the consumer stops early (client disconnected, task cancelled), the engine drops the rows next step.
        """
        stream = _RequestStream(asyncio.get_running_loop())
        request = GenerationRequest(prompt_ids, adapter, params, stream.sink, n=n, prompt_logprobs=prompt_logprobs)
        label = request.metric_label
        self.engine.submit(request)
        metrics.PROMPT_TOKENS.labels(label).inc(len(prompt_ids))
        usage.prompt_tokens += len(prompt_ids)
        access_usage.count(prompt_tokens=len(prompt_ids))  # charged to the caller's quota (KServe routes too)
        first = True
        try:
            async for deltas in stream.events():
                if first:
                    metrics.FIRST_TOKEN_LATENCY.labels(label).observe(time.monotonic() - request.arrival)
                    first = False
                generated = sum(len(d.token_ids) for d in deltas)
                usage.completion_tokens += generated
                access_usage.count(completion_tokens=generated)
                yield deltas
            metrics.REQUEST_LATENCY.labels(label).observe(time.monotonic() - request.arrival)
        finally:
            request.cancelled = True  # no-op once finished; frees the rows of an abandoned request

    async def complete(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, n: int, usage: Usage,
        prompt_logprobs: int | None = None,
    ) -> list[ChoiceDelta]:
        """The `n` finished choices for one prompt (deltas merged)."""
        merged = [ChoiceDelta(index=i, text="", token_ids=[], logprobs=[]) for i in range(n)]
        async for deltas in self.generate(prompt_ids, adapter, params, n, usage, prompt_logprobs):
            for delta in deltas:
                choice = merged[delta.index]
                choice.text += delta.text
                choice.token_ids += delta.token_ids
                choice.logprobs += delta.logprobs
                choice.finish_reason = delta.finish_reason or choice.finish_reason
                choice.prompt_logprobs = choice.prompt_logprobs or delta.prompt_logprobs
        return merged
