"""What the HTTP layers share: name resolution, and generation as an async stream of deltas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tessera.serve import metrics
from tessera.serve.base_model import LoadedBase
from tessera.serve.engine import ChoiceDelta, Engine, EngineError, GenerationRequest
from tessera.serve.registry import AdapterRegistry
from tessera.serve.sampling import SamplingParams


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

    def __init__(self, base: LoadedBase, engine: Engine, registry: AdapterRegistry, served_name: str) -> None:
        self.base = base
        self.engine = engine
        self.registry = registry
        self.served_name = served_name
        self.created = int(time.time())
        self.ready = False  # set once the start-up adapters were loaded

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def resolve(self, model: str) -> str | None:
        """The adapter `model` names, None for the base model; 404 in OpenAI's words otherwise."""
        if model == self.served_name:
            return None
        if self.registry.get(model) is not None:
            return model
        raise EngineError(f"The model `{model}` does not exist.", status=404, code="model_not_found")

    def model_names(self) -> list[str]:
        return [self.served_name, *self.registry.records]

    async def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, n: int, usage: Usage
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Deltas of the `n` choices for one prompt as the engine produces them.

        If the consumer stops early (client disconnected), the engine drops the rows next step.
        """
        stream = _RequestStream(asyncio.get_running_loop())
        request = GenerationRequest(prompt_ids, adapter, params, stream.sink, n=n)
        label = request.metric_label
        self.engine.submit(request)
        metrics.PROMPT_TOKENS.labels(label).inc(len(prompt_ids))
        usage.prompt_tokens += len(prompt_ids)
        first = True
        try:
            async for deltas in stream.events():
                if first:
                    metrics.FIRST_TOKEN_LATENCY.labels(label).observe(time.monotonic() - request.arrival)
                    first = False
                usage.completion_tokens += sum(len(d.token_ids) for d in deltas)
                yield deltas
            metrics.REQUEST_LATENCY.labels(label).observe(time.monotonic() - request.arrival)
        finally:
            request.cancelled = True  # no-op once finished; frees the rows of an abandoned request

    async def complete(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, n: int, usage: Usage
    ) -> list[ChoiceDelta]:
        """The `n` finished choices for one prompt (deltas merged)."""
        merged = [ChoiceDelta(index=i, text="", token_ids=[], logprobs=[]) for i in range(n)]
        async for deltas in self.generate(prompt_ids, adapter, params, n, usage):
            for delta in deltas:
                choice = merged[delta.index]
                choice.text += delta.text
                choice.token_ids += delta.token_ids
                choice.logprobs += delta.logprobs
                choice.finish_reason = delta.finish_reason or choice.finish_reason
        return merged
