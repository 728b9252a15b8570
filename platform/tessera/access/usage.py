"""Token usage a runtime reports in process, for answers that carry none (KServe's v1/v2 bodies).

The middleware opens a counter for each request it passes on; the runtime's code that counts a
request's tokens adds to it (`count`); the counter lives in a context variable, so it follows the
request into the tasks the runtime starts for it. vLLM reports nothing here: its OpenAI answers
carry `usage`, which the middleware reads.
"""

from __future__ import annotations

from contextvars import ContextVar

_CURRENT: ContextVar[list[int] | None] = ContextVar("tessera_access_usage", default=None)


def count(prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    counter = _CURRENT.get()
    if counter is not None:
        counter[0] += prompt_tokens
        counter[1] += completion_tokens


def open_counter() -> tuple[list[int], object]:
    counter = [0, 0]
    return counter, _CURRENT.set(counter)


def close_counter(token: object) -> None:
    _CURRENT.reset(token)  # type: ignore[arg-type]
