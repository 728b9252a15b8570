"""`tessera serve` as a real process on 127.0.0.1, driven by the clients users use.

The openai SDK for completions, chat and streaming; KServe's `InferenceRESTClient` for v1/v2
classification and health; plain HTTP for the vLLM-compatible adapter API and /metrics. Adapters
come from local directories and from S3 (moto's server stands in for MinIO).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.helpers import MAX_LORA_RANK, MAX_LORAS, S3_BUCKET, TINY_NAME, s3_environment

pytestmark = pytest.mark.slow

PROMPT = "Nordea's net profit rose 12% in the third quarter."


def load(server, name: str, path, **extra) -> tuple[int, dict]:
    return server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **extra})


def greedy(client, model: str, prompt: str = PROMPT, max_tokens: int = 10) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def metric_samples(server) -> dict[tuple[str, tuple], float]:
    status, body = server.get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_models_lists_base_and_startup_adapters(client, server):
    ids = [model.id for model in client.models.list()]
    assert ids[0] == TINY_NAME and "startup" in ids
    status, body = server.get("/v1/models")  # KServe v1 clients read `models` from the same document
    assert status == 200 and b'"models"' in body
    assert client.models.retrieve("startup").id == "startup"


def test_completions_with_the_openai_sdk(client, tokenizer):
    result = client.completions.create(model="startup", prompt=PROMPT, max_tokens=8, temperature=0, n=2, logprobs=2)
    first, second = result.choices
    assert first.text == second.text and first.finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert result.usage.completion_tokens == 16
    logprobs = first.logprobs
    assert "".join(logprobs.tokens) == first.text and len(logprobs.token_logprobs) == 8
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp, abs=1e-4)  # greedy: chosen = most likely
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]

    stop = first.text[len(first.text) // 2:][:3]
    stopped = client.completions.create(model="startup", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == first.text[: first.text.index(stop)]

    sampled = [client.completions.create(model="startup", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=s)
               .choices[0].text for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]

    batch = client.completions.create(model="startup", prompt=[PROMPT, "Gold"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert first.text.startswith(batch.choices[0].text)


def test_streaming_completions_and_chat(client):
    expected = greedy(client, "startup", max_tokens=12)
    chunks = list(client.completions.create(model="startup", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Up or down?"}]
    chat = client.chat.completions.create(model="startup", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=1)
    answer = chat.choices[0].message
    assert answer.role == "assistant" and answer.content
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    streamed = client.chat.completions.create(model="startup", messages=messages, max_tokens=6, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.content


def test_openai_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="startup", prompt="x", max_tokens=2, temperature=5)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="startup", prompt="x", max_tokens=5000)
    assert caught.value.body["code"] == "context_length_exceeded"
    status, body = server.post("/v1/chat/completions", {"model": "startup", "messages": [], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"


def test_mixed_adapter_batched_generation_equals_one_at_a_time(client, server, adapters):
    for name in ("mix-1", "mix-2"):
        assert load(server, name, adapters["a1" if name == "mix-1" else "a2"])[0] == 200
    prompts = [PROMPT, "Gold prices fell", "Analysts rate Tesla a buy", "x"]
    jobs = [(model, prompt) for prompt in prompts for model in (TINY_NAME, "startup", "mix-1", "mix-2")]
    alone = [greedy(client, model, prompt, 16) for model, prompt in jobs]
    rows_before = metric_samples(server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: greedy(client, *job, 16), jobs))
    assert together == alone
    after = metric_samples(server)
    steps = after[("tessera_batch_rows_count", ())] - rows_before[("tessera_batch_rows_count", ())]
    rows = after[("tessera_batch_rows_sum", ())] - rows_before[("tessera_batch_rows_sum", ())]
    assert rows / steps > 2, "concurrent requests were not batched together"
    assert len({text for (model, prompt), text in zip(jobs, alone, strict=True) if prompt == PROMPT}) == 4


def test_hot_load_while_requests_are_in_flight(client, server, adapters):
    base_answer = greedy(client, TINY_NAME)
    results, errors = [], []
    started = threading.Barrier(9)

    def stream(model: str) -> None:
        try:
            text, finished = "", None
            for position, chunk in enumerate(client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=160, temperature=0, stream=True)):
                if position == 0:
                    started.wait(timeout=60)
                text += chunk.choices[0].text
                finished = chunk.choices[0].finish_reason or finished
            results.append((model, finished, time.monotonic()))
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("startup", TINY_NAME) * 4]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    status, body = load(server, "hot", adapters["a3"])
    loaded_at = time.monotonic()
    assert status == 200, body
    hot_answer = greedy(client, "hot")  # answers right after the load call returned
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 8
    assert all(finished == "length" for _, finished, _ in results)
    assert sum(ended > loaded_at for _, _, ended in results) >= 4, "the load did not overlap the requests"
    assert hot_answer != base_answer
    assert load(server, "hot-again", adapters["a3"])[0] == 200 and greedy(client, "hot-again") == hot_answer


def test_unload_then_404_in_openai_shape(client, server, adapters):
    assert load(server, "temporary", adapters["a4"])[0] == 200
    assert greedy(client, "temporary")
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "temporary"})
    assert status == 200, body
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(client, "temporary")
    assert caught.value.body == {"message": "The model `temporary` does not exist.", "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "temporary"})
    assert status == 404 and body["error"]["message"] == "The lora adapter 'temporary' cannot be found."
    assert "temporary" not in [m.id for m in client.models.list()]
    assert server.get("/v2/models/temporary/ready")[0] == 404


def test_bad_adapters_are_refused_while_others_keep_serving(client, server, adapters, tmp_path):
    outside = shutil.copytree(adapters["a1"], tmp_path / "elsewhere")
    refused = [
        ("corrupt", adapters["corrupt"], {}, 400, "adapter_corrupt", "safetensors"),
        ("other-base", adapters["other-base"], {}, 400, "base_model_mismatch", "acme/other-llama"),
        ("wrong-name", adapters["wrong-name"], {}, 400, "base_model_mismatch", "Llama-3.1-8B"),
        ("too-big", adapters["rank32"], {}, 400, "rank_too_high", f"maximum {MAX_LORA_RANK}"),
        ("outside", outside, {}, 403, "path_not_allowed", "outside the allowed prefixes"),
        ("missing", server.adapters_root / "nope", {}, 404, "adapter_not_found", "does not exist"),
        ("bad-sha", adapters["a1"], {"sha256": "0" * 64}, 400, "sha256_mismatch", "sha256 mismatch"),
        ("no/slash", adapters["a1"], {}, 400, "invalid_name", "invalid lora_name"),
    ]
    background: list[str | None] = []
    worker = threading.Thread(target=lambda: background.append(
        client.completions.create(model="startup", prompt=PROMPT, max_tokens=120, temperature=0)
        .choices[0].finish_reason))
    worker.start()
    for name, path, extra, status, code, words in refused:
        got_status, body = load(server, name, path, **extra)
        assert (got_status, body["error"]["code"]) == (status, code), (name, body)
        assert words in body["error"]["message"], (name, body)
    worker.join(timeout=120)
    assert background == ["length"]
    served = {m.id for m in client.models.list()}
    assert not served & {name for name, *_ in refused}
    assert greedy(client, "startup")
    failures = metric_samples(server)
    assert failures[("tessera_adapter_load_failures_total", (("code", "rank_too_high"),))] >= 1


def test_adapter_from_s3_with_sha256(client, server, adapters, s3_server, monkeypatch):
    from tessera.adapter_format import weights_sha256
    from tessera.store import push

    for key, value in s3_environment(s3_server).items():
        monkeypatch.setenv(key, value)
    uri = push(adapters["a5"], f"s3://{S3_BUCKET}/adapters/default/s3-adapter/v1")
    status, body = load(server, "from-s3", uri, sha256=weights_sha256(adapters["a5"]))
    assert status == 200, body
    assert load(server, "from-disk", adapters["a5"])[0] == 200
    assert greedy(client, "from-s3") == greedy(client, "from-disk")
    status, body = load(server, "s3-elsewhere", "s3://other-bucket/adapters/x")
    assert status == 403


def test_embedding_lora_adapter_hot_loads_and_answers_like_peft(client, server, adapters, tiny_base, tokenizer):
    """An adapter with LoRA on `embed_tokens` too (as examples/tfns-sentiment.yaml trains) loads over
    the adapter API and answers what peft's own forward of it answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    status, body = load(server, "embed", adapters["embed"])
    assert status == 200, body
    answer = client.completions.create(model="embed", prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["embed"]).eval()
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert answer == tokenizer.decode(ids[-8:], skip_special_tokens=True)
    assert answer != greedy(client, TINY_NAME, max_tokens=8)


def test_lru_eviction_reloads_on_demand(client, server, adapters):
    names = [f"lru-{i}" for i in range(MAX_LORAS + 2)]
    for i, name in enumerate(names):
        assert load(server, name, adapters[f"a{i % 6}"])[0] == 200
    first = {name: greedy(client, name) for name in names}
    second = {name: greedy(client, name) for name in reversed(names)}
    assert first == second
    samples = metric_samples(server)
    assert samples[("tessera_adapter_evictions_total", ())] >= 2
    assert samples[("tessera_adapters_loaded", ())] <= MAX_LORAS


def test_kserve_v1_v2_classification_and_health(server, adapters):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    assert load(server, "positive", adapters["positive"], task="sentiment")[0] == 200  # task from the request
    assert load(server, "negative", adapters["negative"])[0] == 200  # task from its model-card.json
    texts = ["Profit rose 20% on strong demand.", "The bank cut its dividend."]

    async def drive():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            assert await v1.is_server_live(server.url)
            assert await v2.is_server_ready(server.url)
            assert await v2.is_model_ready(server.url, "positive")
            assert await v1.is_model_ready(server.url, "negative")
            positive, negative = await asyncio.gather(
                v1.infer(server.url, {"instances": texts}, model_name="positive"),
                v1.infer(server.url, {"instances": [{"text": t} for t in texts]}, model_name="negative"),
            )
            request = InferRequest(model_name="negative",
                                   infer_inputs=[InferInput("text", [len(texts)], "BYTES", texts)])
            v2_answer = await v2.infer(server.url, request, model_name="negative")
            return positive, negative, v2_answer
        finally:
            await v1.close()
            await v2.close()

    positive, negative, v2_answer = asyncio.run(drive())
    assert positive["predictions"] == ["positive", "positive"]
    assert negative["predictions"] == ["negative", "negative"]
    outputs = {output.name: output.data for output in v2_answer.outputs}
    assert outputs["label"] == ["negative", "negative"]
    status, body = server.post("/v1/models/positive:predict", {"instances": [{"label_only": 1}]})
    assert status == 400 and "text" in body["error"]
    assert server.post("/v1/models/nope:predict", {"instances": ["x"]})[0] == 404


def test_metrics_per_adapter(client, server, adapters):
    assert load(server, "positive", adapters["positive"], load_inplace=True)[0] == 200
    before = metric_samples(server)
    greedy(client, "positive", max_tokens=5)
    after = metric_samples(server)
    key = ("tessera_requests_total", (("adapter", "positive"), ("endpoint", "completions"), ("status", "200")))
    assert after[key] - before.get(key, 0) == 1
    tokens = ("tessera_generation_tokens_total", (("adapter", "positive"),))
    assert after[tokens] - before.get(tokens, 0) >= 1
    latency = ("tessera_request_latency_seconds_count", (("adapter", "positive"),))
    assert after[latency] - before.get(latency, 0) == 1
    assert after[("tessera_adapter_load_seconds_count", (("outcome", "loaded"),))] >= 2
    assert ("tessera_queue_time_seconds_count", (("adapter", "positive"),)) in after


def test_a_client_that_goes_away_frees_its_rows(server):
    """Closing a stream stops its generation: far fewer tokens than asked for are generated."""
    import httpx

    before = metric_samples(server)
    body = {"model": "startup", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 60
    while metric_samples(server)[("tessera_sequences_running", ())] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    key = ("tessera_generation_tokens_total", (("adapter", "startup"),))
    assert metric_samples(server)[key] - before[key] < 1900
