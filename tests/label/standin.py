"""A stand-in teacher: a small aiohttp OpenAI-compatible server on 127.0.0.1 that misbehaves on purpose.

It stands in for a large model behind vLLM or a gateway when that model has a bad day: each
served model name is a behaviour, and the server counts every request it receives and every
answer it gives, per prompt, so tests can prove what was (not) sent twice.

- `sentiment`: answers a sentiment word read off the tweet ("up"/"beat" → positive, "down"/"miss"
  → negative, else neutral), with usage tokens;
- `flaky-429`: 429 with `Retry-After: 0` on the first two attempts of each prompt, then answers;
- `flaky-500`: 500 on the first attempt of each prompt, then answers;
- `always-500`: 500, always (retries must stop);
- `garbage`: HTTP 200 with text that names no label ("I would rather not say.");
- `slow`: waits `slow_seconds` before answering (longer than the client's timeout in tests);
- `disagree`: answers positive, negative, neutral in turn for each prompt, so its samples disagree;
- `recommender`: {"action": "buy", "conviction": 0.8}, but {"action": "sell"} (no conviction) for NRDX;
- any other model: 404 with vLLM's message, as a wrong model name gets.
A request without `Authorization: Bearer <key>` gets 401 (unless the key is None: a server without
keys). `hold_after`: after that many answers, requests are held unanswered until `release()` (to kill
a client mid-run at a known state).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from aiohttp import web

MODELS = ("sentiment", "flaky-429", "flaky-500", "always-500", "garbage", "slow", "disagree", "recommender")


def sentiment_of(prompt: str) -> str:
    text = prompt.lower()
    if " up" in text or "beat" in text:
        return "positive"
    if " down" in text or "miss" in text:
        return "negative"
    return "neutral"


class StandInTeacher:
    def __init__(self, api_key: str | None, *, slow_seconds: float = 5.0, hold_after: int | None = None) -> None:
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.hold_after = hold_after
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.held = threading.Event()  # set once a request is being held
        self._release: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> StandInTeacher:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def release(self) -> None:
        self.hold_after = None
        if self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "error", "code": status}}, status=status,
                                 headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid API key")
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]})

    async def _chat(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid API key")
        body = await request.json()
        model, prompt = body["model"], body["messages"][-1]["content"]
        self.received[prompt] += 1
        attempt = self.received[prompt]
        if model not in MODELS:
            return self._error(404, f"The model `{model}` does not exist.")
        if self.hold_after is not None and sum(self.answered.values()) >= self.hold_after:
            self.held.set()
            assert self._release is not None
            await self._release.wait()
            return self._error(503, "shutting down")
        if model == "flaky-429" and attempt <= 2:
            return self._error(429, "rate limited", **{"Retry-After": "0"})
        if model == "flaky-500" and attempt <= 1:
            return self._error(500, "internal error")
        if model == "always-500":
            return self._error(500, "internal error")
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        text = self._answer(model, prompt)
        self.answered[prompt] += 1
        return web.json_response(self._completion(model, text))

    def _answer(self, model: str, prompt: str) -> str:
        if model == "garbage":
            return "I would rather not say."
        if model == "recommender":
            return '{"action": "sell"}' if "NRDX" in prompt else '{"action": "buy", "conviction": 0.8}'
        if model == "disagree":
            return ("positive", "negative", "neutral")[self.received[prompt] % 3]
        return sentiment_of(prompt)

    @staticmethod
    def _completion(model: str, text: str) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}}
