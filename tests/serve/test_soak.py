"""A bounded mixed-traffic soak: 200 concurrent requests over several adapters, a hostile minority
among them (bad sampling parameters, dropped connections, oversized and malformed inputs).

The well-behaved requests all succeed with the answers they get alone, the server's memory comes
back to within 10% of its level before, and no response or log line carries a secret or a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.helpers import BASE_NAME
from tests.serve.test_server import PROMPT, load, metric_samples

pytestmark = pytest.mark.slow

MODELS = [BASE_NAME, "startup", "soak-1", "soak-2", "soak-3"]
PROMPTS = [PROMPT, "Gold prices fell", "Analysts rate the bank a buy"]
SECRETS = ("serve-test-secret", "AWS_SECRET_ACCESS_KEY", "Traceback", 'File "/')


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def hostile(position: int, url: str) -> dict:
    """One of the hostile kinds, by position: each gets a 4xx, or is a client that goes away."""
    kinds = [
        {"json": {"model": "soak-1", "prompt": "x", "temperature": -1}},
        {"json": {"model": "soak-2", "prompt": "x", "top_p": 0}},
        {"json": {"model": "startup", "prompt": "x", "n": 100}},
        {"json": {"model": "startup", "prompt": "x" * 3_000_000, "max_tokens": 2}},
        {"content": b'{"model": "startup", "prompt": "' + b"y" * (5 << 20) + b'"}'},
        {"json": {"model": "soak-3", "prompt": ["x"] * 500, "n": 16}},
        {"content": b'{"model": "soak-1", "prompt": "\\ud800", "max_tokens": 2}'},
        {"content": b'{"model": "soak-1", "prompt": '},
        {"drop": "stream"},
        {"drop": "wait"},
    ]
    return kinds[position % len(kinds)]


async def soak(url: str, expected: dict[tuple[str, str], str]) -> tuple[list, list]:
    well, bad = [], []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=250)) as http:

        async def good(model: str, prompt: str) -> None:
            response = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                                 "temperature": 0, "ignore_eos": True})
            well.append((response.status_code, response.json()["choices"][0]["text"]
                         if response.status_code == 200 else response.text, expected[(model, prompt)]))

        async def attack(kind: dict) -> None:
            if kind.get("drop") == "stream":
                body = {"model": "soak-2", "prompt": PROMPT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            break  # and the connection closes
                bad.append((0, ""))
            elif kind.get("drop") == "wait":
                body = {"model": "soak-3", "prompt": PROMPT, "max_tokens": 1500, "n": 4, "ignore_eos": True}
                with pytest.raises(httpx.TimeoutException):
                    await http.post("/v1/completions", json=body, timeout=1.0)
                bad.append((0, ""))
            else:
                headers = {"content-type": "application/json"}
                response = await http.post("/v1/completions", headers=headers, **kind)
                bad.append((response.status_code, response.text))

        jobs = []
        for i in range(200):
            if i % 7 == 3:  # 29 of 200
                jobs.append(attack(hostile(i, url)))
            else:
                model, prompt = MODELS[i % len(MODELS)], PROMPTS[i % len(PROMPTS)]
                jobs.append(good(model, prompt))
        await asyncio.gather(*jobs)
    return well, bad


def test_mixed_traffic_soak(server, adapters):
    for i in (1, 2, 3):
        assert load(server, f"soak-{i}", adapters[f"a{i}"], load_inplace=True)[0] == 200

    def alone() -> dict[tuple[str, str], str]:
        answers = {}
        for model in MODELS:
            for prompt in PROMPTS:
                status, body = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0, "ignore_eos": True})
                assert status == 200, body
                answers[(model, prompt)] = body["choices"][0]["text"]
        return answers

    expected = alone()
    asyncio.run(soak(server.url, expected))  # warm-up: the allocator's arenas reach their working size
    idle = ("tessera_sequences_running", ())
    while metric_samples(server)[idle] > 0:
        time.sleep(0.1)
    gc.collect()
    before = rss_bytes(server.process.pid)
    log_start = server.log.stat().st_size

    started = time.monotonic()
    well, bad = asyncio.run(soak(server.url, expected))
    elapsed = time.monotonic() - started

    assert len(well) == 171 and len(bad) == 29
    assert all(status == 200 and text == want for status, text, want in well), [w for w in well if w[0] != 200][:3]
    assert all(status == 0 or 400 <= status < 500 for status, _ in bad), [b for b in bad if b[0] >= 500][:3]
    deadline = time.monotonic() + 60
    while metric_samples(server)[idle] > 0:
        assert time.monotonic() < deadline, "abandoned requests kept generating"
        time.sleep(0.1)
    after = rss_bytes(server.process.pid)
    print(f"\nsoak: 200 requests in {elapsed:.1f}s; server RSS {before / 2**20:.0f} MiB before, "
          f"{after / 2**20:.0f} MiB after")
    assert after <= before * 1.10
    seen = "\n".join(text for _, text in bad) + server.log.read_bytes()[log_start:].decode(errors="replace")
    for secret in SECRETS:
        assert secret not in seen
    assert expected == alone()  # and the server answers as before
