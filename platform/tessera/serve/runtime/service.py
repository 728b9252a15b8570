"""What the HTTP layers share: name resolution, bounded tokenization off the event loop, the request
budget, and generation as an async stream of deltas."""

from __future__ import annotations

import asyncio
import math
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
    """What one request may ask for, so no request can take the server's memory or time from others.

    One budget for everything a request makes the server compute or return, each checked before
    the work it bounds starts, each named by its `tessera serve` option in the refusal."""

    max_request_bytes: int = 4 << 20  # the body, before anything parses it
    max_prompts: int = 64  # prompts (or KServe instances) in one request
    max_prompt_tokens: int = 131072  # prompt tokens over all prompts, messages or instances of one request
    max_request_tokens: int = 65536  # prompts x n x max_tokens: tokens one request may make the engine generate
    max_response_bytes: int = 16 << 20  # the answer's estimated size: text, echoed prompts, logprobs


# A returned token's share of an answer: its text and, with logprobs, each entry (text, number,
# punctuation). An estimate from OpenAI-shaped answers of the tiny and SmolLM2 models (25 MB for
# 128k echoed tokens with 5 alternatives is 32 bytes an entry).
TOKEN_ENTRY_BYTES = 32


@dataclass(frozen=True)
class RequestCost:
    """What one request will make the server compute and return, known before generation starts."""

    prompts: int
    prompt_tokens: int  # over all prompts
    n: int
    max_tokens: int
    echoed_tokens: int = 0  # prompt tokens returned with each choice (echo), over all prompts
    logprobs: int | None = None  # alternatives reported per returned token; None: no logprobs

    @property
    def generated_tokens(self) -> int:
        return self.prompts * self.n * self.max_tokens

    @property
    def response_bytes(self) -> int:
        returned = self.n * self.echoed_tokens + self.generated_tokens
        entries = 1 + (self.logprobs + 1 if self.logprobs is not None else 0)
        return returned * entries * TOKEN_ENTRY_BYTES


def too_large(what: str, limit: int, option: str, param: str, advice: str) -> ServeError:
    return ServeError(f"{what}; at most {limit} per request (tessera serve {option}): {advice}",
                      code="request_too_large", param=param)


def check_budget(limits: RequestLimits, cost: RequestCost) -> None:
    """Refuse, before any generation, a request over any line of the budget, naming that line."""
    if cost.prompts > limits.max_prompts:
        raise ServeError(f"at most {limits.max_prompts} prompts in one request (got {cost.prompts}; "
                         "tessera serve --max-prompts)", code="too_many_prompts", param="prompt")
    check_prompt_tokens(limits, cost.prompt_tokens, "prompt")
    if cost.generated_tokens > limits.max_request_tokens:
        raise too_large(
            f"this request could generate {cost.generated_tokens} tokens ({cost.prompts} prompt(s) x n={cost.n} x "
            f"max_tokens={cost.max_tokens})", limits.max_request_tokens, "--max-request-tokens", "max_tokens",
            "lower n or max_tokens")
    if cost.response_bytes > limits.max_response_bytes:
        raise too_large(
            f"the answer to this request could be {cost.response_bytes} bytes ({cost.n * cost.echoed_tokens} echoed "
            f"and {cost.generated_tokens} generated tokens, logprobs={cost.logprobs})", limits.max_response_bytes,
            "--max-response-bytes", "logprobs" if cost.logprobs is not None else "max_tokens",
            "ask fewer logprobs, fewer prompts, or no echo")


def check_prompt_tokens(limits: RequestLimits, tokens: int, param: str, at_least: bool = False) -> None:
    if tokens > limits.max_prompt_tokens:
        raise too_large(f"the prompts of this request hold {'at least ' if at_least else ''}{tokens} tokens",
                        limits.max_prompt_tokens, "--max-prompt-tokens", param, "send fewer or shorter prompts")


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
        self.longest_token_chars = max(longest, 1)
        self.max_text_chars = engine.max_model_len * self.longest_token_chars
        # Each token's text, decoded once: logprobs are rendered from this table, off the tokenizer. The
        # model's vocabulary may be padded past the tokenizer's; those ids decode to nothing.
        vocab = max(len(self.tokenizer), int(base.model.config.vocab_size))
        self.token_texts: list[str] = self.tokenizer.batch_decode([[i] for i in range(vocab)])

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

    def least_tokens(self, text: str) -> int:
        """No text has fewer tokens than this: no token is longer than the longest vocabulary entry."""
        return math.ceil(len(text) / self.longest_token_chars)

    def check_prompt_texts(self, texts: list[str], param: str, known_tokens: int = 0) -> None:
        """Each text's checks, and the request's prompt budget by the least tokens the texts can hold:
        all before anything is tokenized."""
        for text in texts:
            self.check_text(text, param)
        check_prompt_tokens(self.limits, known_tokens + sum(self.least_tokens(t) for t in texts), param,
                            at_least=True)

    async def tokenize(self, work: Callable[[], T]) -> T:
        """Run `work` (which uses the tokenizer) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work)

    async def encode_each(self, encoders: list[Callable[[], list[int]]], param: str,
                          known_tokens: int = 0) -> list[list[int]]:
        """Token ids of each prompt, on the tokenizer thread, stopping as soon as the request's prompts
        hold more tokens than its budget (`known_tokens`: those of prompts given as token ids)."""

        def encode() -> list[list[int]]:
            total, encoded = known_tokens, []
            for encoder in encoders:
                ids = encoder()
                total += len(ids)
                check_prompt_tokens(self.limits, total, param, at_least=True)
                encoded.append(ids)
            return encoded

        return await self.tokenize(encode)

    async def encode(self, texts: list[str], param: str, known_tokens: int = 0) -> list[list[int]]:
        """Token ids of each text, with the tokenizer's special tokens, within the request's budget."""
        self.check_prompt_texts(texts, param, known_tokens)
        return await self.encode_each([lambda text=text: self.tokenizer(text).input_ids for text in texts], param,
                                      known_tokens)

    def metric_label(self, model: str) -> str:
        """The `adapter` label of requests naming `model`: bounded to the names the server serves."""
        if model in (self.served_name, self.kserve_name):
            return metrics.BASE_LABEL
        return model if self.registry.get(model) is not None else "unknown"

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
