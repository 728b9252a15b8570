"""What standard clients expect of `tessera serve`, beyond the basics of test_server.py: vLLM's
adapter API answers exactly as vLLM's, KServe's client on v1/v2 over the same registry as the
OpenAI routes (repository load/unload included), KServe's error shape on KServe routes, the OpenAI
SDK's details (`echo`, `usage: null`, `logprobs: 0`, malformed JSON), request limits, an abandoned
request cancelled, and the README's commands run as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time

import httpx
import openai
import pytest

from tests.serve.helpers import BASE_NAME, TINY_NAME
from tests.serve.test_server import PROMPT, greedy, load, metric_samples

pytestmark = pytest.mark.slow

ALREADY = ("The lora adapter '{}' has already been loaded. If you want to load the adapter in place, "
           "set 'load_inplace' to True.")


def raw_post(server, path: str, content: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def new_log(server, start: int) -> str:
    return server.log.read_bytes()[start:].decode(errors="replace")


def test_vllm_adapter_api_answers_as_vllm(client, server, adapters):
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(
        adapters["a1"])}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert response.text == "Success: LoRA adapter 'vl' added successfully."
    first = greedy(client, "vl")

    status, body = load(server, "vl", adapters["a2"])  # already served: refused, nothing replaced
    assert (status, body["error"]["message"], body["error"]["type"]) == (400, ALREADY.format("vl"), "InvalidUserInput")
    assert greedy(client, "vl") == first
    status, body = load(server, "vl", adapters["a2"], load_inplace=True)
    assert status == 200 and body == "Success: LoRA adapter 'vl' added successfully."
    assert load(server, "vl-2", adapters["a2"])[0] == 200
    assert greedy(client, "vl") == greedy(client, "vl-2") != first

    status, body = load(server, "", adapters["a2"])
    assert (status, body["error"]["message"]) == (400, "Both 'lora_name' and 'lora_path' must be provided.")
    assert load(server, BASE_NAME, adapters["a2"])[0] == 400  # the base model's name is not an adapter's
    # Tessera's own checks keep their own codes.
    assert load(server, "vl-3", adapters["a2"], sha256="0" * 64)[1]["error"]["code"] == "sha256_mismatch"

    cards = {card.id: card for card in client.models.list()}
    int_id = cards["vl"].model_extra["lora_int_id"]
    assert cards["vl-2"].model_extra["lora_int_id"] != int_id
    status, body = server.post("/v1/unload_lora_adapter", {"lora_int_id": int_id})  # by lora_int_id alone
    assert (status, body) == (200, "Success: LoRA adapter 'vl' removed successfully.")
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "vl"})
    assert (status, body["error"]["message"]) == (404, "The lora adapter 'vl' cannot be found.")
    assert server.post("/v1/unload_lora_adapter", {})[0] == 400
    with pytest.raises(openai.NotFoundError):
        greedy(client, "vl")


def test_kserve_client_and_repository_round_trip(client, server, adapters):
    """KServe's `InferenceRESTClient` (v1 and v2) and KServe's repository API see the same adapters as
    the OpenAI routes: an unload through KServe stops the adapter everywhere, a load brings it back."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    assert load(server, "ks-negative", adapters["negative"])[0] == 200
    texts = ["The bank cut its dividend.", "Sales were flat."]

    async def ready(v2, name: str) -> bool:
        try:
            return await v2.is_model_ready(server.url, name)
        except httpx.HTTPStatusError:
            return False

    async def drive():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            try:
                states = {"base": await ready(v2, BASE_NAME), "before": await ready(v2, "ks-negative")}
                request = InferRequest(model_name=BASE_NAME, infer_inputs=[InferInput("text", [1], "BYTES", ["Gold"])])
                base_answer = await v2.infer(server.url, request, model_name=BASE_NAME)
                unloaded = await http.post("/v2/repository/models/ks-negative/unload")
                states["unloaded"] = await ready(v2, "ks-negative")
                listed = [m.id for m in client.models.list()]
                with pytest.raises(openai.NotFoundError):
                    greedy(client, "ks-negative")
                again = await http.post("/v2/repository/models/ks-negative/unload")
                loaded = await http.post("/v2/repository/models/ks-negative/load")
                states["loaded"] = await ready(v2, "ks-negative")
                answer = await v1.infer(server.url, {"instances": texts}, model_name="ks-negative")
                unknown = await http.post("/v2/repository/models/never-loaded/load")
                base_unload = await http.post(f"/v2/repository/models/{BASE_NAME}/unload")
                return states, base_answer, unloaded, listed, again, loaded, answer, unknown, base_unload
            finally:
                await v1.close()
                await v2.close()

    states, base_answer, unloaded, listed, again, loaded, answer, unknown, base_unload = asyncio.run(drive())
    assert states == {"base": True, "before": True, "unloaded": False, "loaded": True}
    assert {o.name for o in base_answer.outputs} == {"label", "text"}
    assert unloaded.json() == {"name": "ks-negative", "unload": True} and "ks-negative" not in listed
    assert again.status_code == 404 and "error" in again.json()
    assert loaded.json() == {"name": "ks-negative", "load": True}
    assert answer["predictions"] == ["negative", "negative"]
    assert client.completions.create(model="ks-negative", prompt=PROMPT, max_tokens=2).choices  # OpenAI routes too
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    assert base_unload.status_code == 400 and set(base_unload.json()) == {"error"}
    assert greedy(client, TINY_NAME) == greedy(client, BASE_NAME)  # KServe's name for the base works on OpenAI's too


def test_kserve_errors_are_kserve_shaped_4xx_without_tracebacks(server, adapters):
    assert load(server, "ks-positive", adapters["positive"])[0] == 200
    assert load(server, "no-task", adapters["a3"])[0] == 200  # a checkpoint directory: no model card, no task
    start = server.log.stat().st_size
    v2 = "/v2/models/ks-positive/infer"
    good = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Profit rose."]}]}
    cases = [
        (raw_post(server, v2, b'{"inputs": [', "application/json"), 400, "JSON"),
        (raw_post(server, v2, json.dumps({"inputs": [{**good["inputs"][0], "shape": [3]}]}).encode()), 400, "shape"),
        (raw_post(server, v2, b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
                              b'"data": ["\\ud800"]}]}'), 400, "surrogate"),
        (raw_post(server, v2, json.dumps({"inputs": [{**good["inputs"][0], "data": ["word " * 3000]}]}).encode()),
         400, "context length"),
        (raw_post(server, "/v1/models/ks-positive:predict", json.dumps({"instances": ["x" * 200_000]}).encode()),
         400, "context length"),
        (raw_post(server, "/v1/models/no-task:predict", b'{"instances": ["Profit rose."]}'), 409, "task"),
        (raw_post(server, "/v2/models/no-task/infer", json.dumps(good).encode()), 409, "task"),
        (raw_post(server, "/v1/models/nope:predict", b'{"instances": ["x"]}'), 404, "nope"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and words in body["error"], body
    # curl's -d sends no JSON content type: the body is JSON all the same.
    plain = raw_post(server, "/v1/models/ks-positive:predict", b'{"instances": ["Profit rose."]}',
                     "application/x-www-form-urlencoded")
    assert plain.status_code == 200 and plain.json()["predictions"] == ["positive"]
    time.sleep(0.5)
    log = new_log(server, start)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_openai_sdk_details(client, server, tokenizer):
    # echo: the prompt with its logprobs (the first null), then the completion; max_tokens 0 scores the prompt only.
    prompt_ids = tokenizer(PROMPT).input_ids
    scored = client.completions.create(model="startup", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    (choice,) = scored.choices
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.token_logprobs) == len(prompt_ids) and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.top_logprobs[0] is None and all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
    plus_one = client.completions.create(model="startup", prompt=[prompt_ids, prompt_ids[:5]], max_tokens=1,
                                         echo=True, logprobs=1, temperature=0)
    first, short = plus_one.choices
    assert first.logprobs.token_logprobs[:-1] == pytest.approx(choice.logprobs.token_logprobs[:], abs=1e-4)
    assert short.logprobs.token_logprobs[:5] == pytest.approx(choice.logprobs.token_logprobs[:5], abs=1e-4)
    assert first.text == tokenizer.decode(prompt_ids) + greedy(client, "startup", max_tokens=1)
    streamed = client.completions.create(model="startup", prompt=PROMPT, max_tokens=3, echo=True, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + greedy(client, "startup", max_tokens=3)

    # logprobs 0: each position still names its own token, as vLLM does.
    zero = client.completions.create(model="startup", prompt=PROMPT, max_tokens=4, logprobs=0, temperature=0)
    logprobs = zero.choices[0].logprobs
    assert [list(top) for top in logprobs.top_logprobs] == [[token] for token in logprobs.tokens]

    # include_usage: every chunk carries `usage`, null until the last.
    body = {"model": "startup", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    for path, extra in (("/v1/completions", {}),
                        ("/v1/chat/completions", {"prompt": None, "messages": [{"role": "user", "content": "Hi"}]})):
        request = {k: v for k, v in {**body, **extra}.items() if v is not None}
        with httpx.stream("POST", server.url + path, json=request, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["usage"]["completion_tokens"] == 5

    # Malformed JSON: no position as `param`, a message that says what is wrong.
    response = raw_post(server, "/v1/completions", b'{"model": "startup", "prompt": "x" "max_tokens": 2}')
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] is None and "not valid JSON" in error["message"]
    # A lone surrogate: a clear 400, never a 500.
    for path, payload in (("/v1/completions", b'{"model": "startup", "prompt": "a\\ud800b", "max_tokens": 2}'),
                          ("/v1/chat/completions",
                           b'{"model": "startup", "messages": [{"role": "user", "content": "\\udfff"}]}')):
        response = raw_post(server, path, payload)
        assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"], response.text


def test_request_limits_are_clear_4xx(client, server):
    start = server.log.stat().st_size
    too_big = raw_post(server, "/v1/completions", b'{"model": "startup", "prompt": "' + b"x" * (5 << 20) + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "startup", "prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    chunked = httpx.post(f"{server.url}/v2/models/startup/infer", content=chunks(), timeout=60)
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]
    with pytest.raises(openai.BadRequestError) as caught:  # refused by its length, before it is tokenized
        client.completions.create(model="startup", prompt="word " * 600_000, max_tokens=2)
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="startup", prompt=["x"] * 65, max_tokens=2)
    assert caught.value.body["code"] == "too_many_prompts"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="startup", prompt=["x"] * 8, n=16, max_tokens=1000)
    assert caught.value.body["code"] == "request_too_large" and "n=16" in caught.value.body["message"]
    assert greedy(client, "startup")
    assert "Traceback" not in new_log(server, start)


def test_an_abandoned_non_streaming_request_is_cancelled(server):
    """A client that times out and closes its connection: its rows leave the batch."""
    key = ("tessera_generation_tokens_total", (("adapter", "startup"),))
    before = metric_samples(server)[key]
    body = {"model": "startup", "prompt": PROMPT, "max_tokens": 1900, "n": 4, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 60
    while metric_samples(server)[("tessera_sequences_running", ())] > 0:
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.1)
    assert metric_samples(server)[key] - before < 4 * 1900


def test_readme_serving_commands_as_written(server, adapters, tmp_path):
    """The README's serving block, run by bash as written: only the address and the adapter path
    (a placeholder there) are this test's; the server is the session's."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"## Serving.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = "\n".join(line for line in block.splitlines() if not line.startswith("tessera "))  # the fixture's
    host = server.url.removeprefix("http://")
    script = (commands.replace("localhost:8080", host).replace("127.0.0.1:8080", host)
              .replace(".tessera/store/adapters/default/tfns-sentiment/<version>", str(adapters["positive"])))
    assert "<version>" not in script and host in script
    done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout  # curl adds no newline: the answers follow one another
    assert "Success: LoRA adapter 'tfns-sentiment' added successfully." in out
    assert re.search(r'"object":"list","data":\[.*"id":"tfns-sentiment"', out)
    assert '{"predictions":["positive"]' in out
    assert out.endswith("Success: LoRA adapter 'tfns-sentiment' removed successfully.")
