"""Issue 23, against a real `tessera serve` on 127.0.0.1 (the tiny model): one caller must never
change what another receives or hold the server from it.

The server reads its S3 adapters through `GatedStore` (a pass-through in front of the session's
moto server, which stands in for MinIO) so a test can hold a store fetch and race it for real.
Each test names the defect class it covers; each failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest

from tests.serve.gated_store import GatedStore
from tests.serve.helpers import S3_BUCKET, make_adapter, s3_environment, serving

pytestmark = pytest.mark.slow

READ_TIMEOUT = 2  # seconds, the server's --read-timeout here
MAX_CONNECTIONS = 12
PROMPT_BUDGET = 100_000  # --max-prompt-tokens: below 64 prompts x the tiny model's 2048 context


@pytest.fixture(scope="module")
def store(s3_server):
    gated = GatedStore(s3_server)
    yield gated
    gated.open()
    gated.shutdown()


@pytest.fixture(scope="module")
def hardened(tiny_base, store, tmp_path_factory):
    """A server of its own: 2 adapter slots, short read deadlines, a small connection cap."""
    root = tmp_path_factory.mktemp("hardened")
    env = s3_environment(store.endpoint)
    with mock.patch.dict(os.environ, env):
        with serving(tiny_base, root, "--max-loras", "2", "--max-lora-rank", "16", "--allowed-prefix", str(root),
                     "--allowed-prefix", f"s3://{S3_BUCKET}", "--read-timeout", str(READ_TIMEOUT),
                     "--keep-alive-timeout", str(READ_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                     "--max-prompt-tokens", str(PROMPT_BUDGET)) as url:
            yield url, root, root / "server.log"


def post(url: str, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers=headers, timeout=120)
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def load(url: str, name: str, path: str, **extra) -> httpx.Response:
    return post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})


def greedy(url: str, model: str) -> str:
    answer = post(url, "/v1/completions", {"model": model, "prompt": "Profit rose", "max_tokens": 8,
                                           "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def wait_for_log(log: Path, *lines: str, start: int = 0) -> str:
    """Wait until the server logged one of `lines` (a state, not a time)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_bytes()[start:].decode(errors="replace")
        if found := next((line for line in lines if line in text), None):
            return found
        time.sleep(0.05)
    raise AssertionError(f"none of {lines} in the server log")


# ---- 1. a stale reload must never serve the old version ----


def test_a_reload_of_an_evicted_adapter_never_overwrites_an_in_place_update(hardened, store, tiny_base, s3_server):
    from tessera.store import push

    url, root, log = hardened
    with mock.patch.dict(os.environ, s3_environment(s3_server)):
        old = push(make_adapter(tiny_base, root / "x-v1", seed=21), f"s3://{S3_BUCKET}/stale/x/v1")
        new = push(make_adapter(tiny_base, root / "x-v2", seed=22), f"s3://{S3_BUCKET}/stale/x/v2")
    for name, path in (("x", old), ("x-new", new)):
        assert load(url, name, path).status_code == 200
    old_answer, new_answer = greedy(url, "x"), greedy(url, "x-new")
    assert old_answer != new_answer
    # Two other adapters take both slots: x is evicted (least recently used).
    start = log.stat().st_size
    for name in ("filler-1", "filler-2"):
        assert load(url, name, str(make_adapter(tiny_base, root / name, seed=23))).status_code == 200
    greedy(url, "x-new")
    wait_for_log(log, "evicted adapter x from", start=start)

    store.close_on("stale/x/v1/adapter_model.safetensors")
    waiting = {}
    asker = threading.Thread(target=lambda: waiting.setdefault("answer", greedy(url, "x")))
    asker.start()  # x is evicted: this request makes the server reload v1, whose fetch the store holds
    assert store.held.wait(60), "the server never fetched the evicted adapter again"
    start = log.stat().st_size
    assert load(url, "x", new, load_inplace=True).status_code == 200  # meanwhile, x becomes v2
    asker.join(60)
    assert waiting["answer"] == new_answer
    store.open()  # the stale fetch of v1 ends now
    wait_for_log(log, "reloaded evicted adapter x", "discarded the reload of adapter x", start=start)
    card = httpx.get(f"{url}/v1/models/x", timeout=30).json()
    assert card["root"] == new and greedy(url, "x") == new_answer


# ---- 2 and 3. one budget per request, checked before the work ----


def test_echo_scoring_counts_in_the_budget(hardened):
    url, _, _ = hardened
    prompts = [[10 + (i * 7 + j) % 4000 for j in range(1500)] for i in range(64)]  # 96,000 tokens in all
    answer = post(url, "/v1/completions", {"model": "tessera/tiny-llama", "prompt": prompts, "max_tokens": 0,
                                           "echo": True, "logprobs": 5})
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["param"] == "logprobs" and "--max-response-bytes" in error["message"], error


def test_the_prompt_budget_counts_every_message_prompt_and_instance(hardened, tokenizer):
    url, _, log = hardened
    start = log.stat().st_size
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer))) if isinstance(t, str))
    per_message = 2048 * longest - 10  # each fits the context by its length alone; together they cannot
    messages = [{"role": "user", "content": "x" * per_message}] * (3_800_000 // per_message)
    answer = post(url, "/v1/chat/completions", {"model": "tessera/tiny-llama", "messages": messages,
                                                "max_tokens": 1})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "messages" and "characters long" in error["message"], error  # before tokenizing

    words = 1700
    text = "profit " * words
    while len(tokenizer(text).input_ids) > 1900:
        words -= 50
        text = "profit " * words
    assert len(tokenizer(text).input_ids) * 64 > PROMPT_BUDGET
    answer = post(url, "/v1/completions", {"model": "tessera/tiny-llama", "prompt": [text] * 64, "max_tokens": 1})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "prompt" and "--max-prompt-tokens" in error["message"], error
    answer = post(url, "/v1/models/tiny-llama:predict", {"instances": [text] * 64})
    assert answer.status_code == 400 and "--max-prompt-tokens" in answer.json()["error"], answer.text[:300]
    assert "Traceback" not in log.read_bytes()[start:].decode(errors="replace")


# ---- 6. stop strings are bounded ----


def test_stop_strings_are_bounded_in_length(hardened):
    url, _, _ = hardened
    body = {"model": "tessera/tiny-llama", "prompt": "Profit rose", "max_tokens": 4, "n": 2}
    answer = post(url, "/v1/completions", {**body, "stop": ["x" * 257, "y"]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop", answer.text
    assert "256" in answer.json()["error"]["message"]
    answer = post(url, "/v1/chat/completions", {"model": "tessera/tiny-llama", "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "Hi"}], "stop": "z" * 300})
    assert answer.status_code == 400
    assert post(url, "/v1/completions", {**body, "stop": ["x" * 256] * 4}).status_code == 200


# ---- 7 and 8. adapter names and the series of unloaded adapters ----


def test_adapter_names_full_match(hardened, tiny_base):
    url, root, _ = hardened
    path = str(make_adapter(tiny_base, root / "dup", seed=24))
    answer = load(url, "dup\n", path)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_name", answer.text
    names = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert "dup\n" not in names


def test_an_unloaded_adapters_metric_series_are_removed(hardened, tiny_base):
    url, root, _ = hardened
    path = str(make_adapter(tiny_base, root / "brief", seed=25))
    for round_ in range(3):
        name = f"brief-{round_}"
        assert load(url, name, path).status_code == 200
        greedy(url, name)
        assert f'adapter="{name}"' in httpx.get(f"{url}/metrics", timeout=30).text
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
        assert f'adapter="{name}"' not in httpx.get(f"{url}/metrics", timeout=30).text


# ---- 9. every malformed KServe v2 request is a KServe-shaped 400 ----


def _binary(header: dict, data: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + data, len(head)


def test_malformed_kserve_v2_requests_are_400s_without_tracebacks(hardened):
    url, _, log = hardened
    start = log.stat().st_size
    infer = "/v2/models/tiny-llama/infer"

    def text_input(**extra) -> dict:
        return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": extra}]}

    cases = {
        "bad length prefix": _binary(text_input(binary_data_size=8), struct.pack("<I", 1000) + b"abcd"),
        "truncated data": _binary(text_input(binary_data_size=20), struct.pack("<I", 16) + b"abc"),
        "negative size": _binary(text_input(binary_data_size=-4), b"abcd"),
        "string size": _binary(text_input(binary_data_size="four"), b"abcd"),
        "shape mismatch": _binary({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                                               "parameters": {"binary_data_size": 8}}]},
                                  struct.pack("<I", 4) + b"abcd"),
        "no inputs": _binary({"outputs": []}, b""),
        "non-UTF-8 bytes": _binary(text_input(binary_data_size=6), struct.pack("<I", 2) + b"\xff\xfe"),
        "odd FP32 bytes": _binary({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 7}}]}, b"\x00" * 7),
    }
    for case, (body, length) in cases.items():
        answer = post(url, infer, body, **{"inference-header-content-length": str(length),
                                           "content-type": "application/octet-stream"})
        assert answer.status_code == 400, (case, answer.status_code, answer.text)
        assert set(answer.json()) == {"error"}, case
    body, _ = cases["bad length prefix"]
    answer = post(url, infer, body, **{"inference-header-content-length": "twelve"})
    assert answer.status_code == 400 and set(answer.json()) == {"error"}
    good = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Profit rose."]}]}
    answer = post(url, "/v2/models/tiny-llama/versions/1/infer", good)
    assert answer.status_code == 400 and "versions" in answer.json()["error"]
    assert post(url, infer, good).status_code == 200
    text = log.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in text and " ERROR " not in text, text[-2000:]


# ---- 5. connections that never finish a request are closed ----


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT * 10)  # bounds a broken test
    return connection


def _answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_unfinished_requests_get_408_and_idle_connections_are_closed(hardened):
    url, _, _ = hardened
    partial_headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
    short_body = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
    for sent in (partial_headers, short_body, chunked):
        with _connect(url) as connection:
            connection.sendall(sent)
            answer = _answer(connection)
        assert answer.startswith(b"HTTP/1.1 408"), (sent, answer)
    with _connect(url) as idle:  # never sends a byte: closed without an answer
        assert _answer(idle) == b""
    with _connect(url) as refused:  # answered 413 before its body came: closed, never answered twice
        refused.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 9000000\r\n\r\n{\"model\": ")
        answer = _answer(refused)
    assert answer.startswith(b"HTTP/1.1 413") and b"408" not in answer, answer


def test_connections_beyond_the_cap_get_503(hardened):
    url, _, _ = hardened
    idle = [_connect(url) for _ in range(MAX_CONNECTIONS)]
    try:
        with _connect(url) as one_more:  # answered at once, before it sends anything
            assert _answer(one_more).startswith(b"HTTP/1.1 503")
    finally:
        for connection in idle:
            connection.close()
