"""The serving boundary's pure parts: which routes are KServe's, how every exception maps to one
error, the request budget, and prompt logprobs from logits."""

from __future__ import annotations

import pytest
import torch
from kserve.errors import InvalidInput, ModelNotFound
from tessera.serve.errors import ServeError
from tessera.serve.http.errors import as_serve_error, is_kserve_route, kserve_body, openai_body
from tessera.serve.runtime.engine import prompt_logprobs
from tessera.serve.runtime.service import RequestCost, RequestLimits, check_budget, valid_unicode


def test_kserve_routes_are_told_from_openai_routes():
    for path in ("/v2/models/a/infer", "/v2/health/ready", "/v2", "/v1/models/a:predict", "/v1/models/a:b:explain"):
        assert is_kserve_route(path), path
    for path in ("/v1/models", "/v1/models/a", "/v1/completions", "/openai/v1/models/tessera/tiny-llama",
                 "/v1/load_lora_adapter", "/v2x"):
        assert not is_kserve_route(path), path


def test_every_exception_maps_to_one_error_and_internals_stay_inside():
    secret = "AWS_SECRET_ACCESS_KEY=abc /etc/credentials"  # noqa: S105 - what must not leak
    unexpected = as_serve_error(RuntimeError(secret))
    assert unexpected.status == 500 and secret not in unexpected.message
    assert secret not in str(openai_body(unexpected)) and secret not in str(kserve_body(unexpected))
    assert as_serve_error(InvalidInput("bad shape")).status == 400
    assert as_serve_error(ModelNotFound("x")).status == 404
    error = ServeError("nope", status=409, code="no_task", param="model")
    assert as_serve_error(error) is error
    assert openai_body(error) == {"error": {"message": "nope", "type": "invalid_request_error", "param": "model",
                                            "code": "no_task"}}
    assert kserve_body(error) == {"error": "nope"}


def test_request_budget_and_text_checks():
    limits = RequestLimits(max_prompts=4, max_request_tokens=100, max_prompt_tokens=1000, max_response_bytes=64_000)
    check_budget(limits, RequestCost(prompts=4, prompt_tokens=1000, n=5, max_tokens=5))
    with pytest.raises(ServeError) as caught:
        check_budget(limits, RequestCost(prompts=5, prompt_tokens=5, n=1, max_tokens=1))
    assert caught.value.code == "too_many_prompts"
    with pytest.raises(ServeError) as caught:
        check_budget(limits, RequestCost(prompts=2, prompt_tokens=2, n=5, max_tokens=11))
    assert caught.value.code == "request_too_large" and caught.value.param == "max_tokens"
    assert "--max-request-tokens" in caught.value.message
    with pytest.raises(ServeError) as caught:  # all prompts together, not each
        check_budget(limits, RequestCost(prompts=4, prompt_tokens=1001, n=1, max_tokens=1))
    assert caught.value.param == "prompt" and "--max-prompt-tokens" in caught.value.message
    # Scoring alone (max_tokens 0, echo with logprobs) is counted: every echoed token and its alternatives.
    scoring = RequestCost(prompts=1, prompt_tokens=400, n=1, max_tokens=0, echoed_tokens=400, logprobs=5)
    assert scoring.generated_tokens == 0 and scoring.response_bytes > limits.max_response_bytes
    with pytest.raises(ServeError) as caught:
        check_budget(limits, scoring)
    assert caught.value.param == "logprobs" and "--max-response-bytes" in caught.value.message
    assert valid_unicode("d\u00e9j\u00e0 vu \U0001f4c8", "prompt")
    with pytest.raises(ServeError) as caught:
        valid_unicode("ab\udc80", "prompt")
    assert caught.value.status == 400 and "character 2" in caught.value.message


def test_prompt_logprobs_are_each_tokens_logprob_given_the_ones_before():
    torch.manual_seed(0)
    prompt = [5, 2, 7, 1]
    logits = torch.randn(len(prompt) - 1, 10)
    report = prompt_logprobs(logits, prompt, top=2)
    assert report[0] is None and [r.token_id for r in report[1:]] == prompt[1:]
    expected = torch.log_softmax(logits, -1)
    for position, item in enumerate(report[1:]):
        assert item.logprob == pytest.approx(float(expected[position, prompt[position + 1]]))
        assert [t for t, _ in item.top] == expected[position].topk(2).indices.tolist()
    assert prompt_logprobs(logits[:0], [3], top=1) == [None]


def test_scoring_rows_are_prefilled_in_groups_of_bounded_logits():
    from types import SimpleNamespace

    from tessera.serve.runtime import engine

    def row(length: int):
        return SimpleNamespace(request=SimpleNamespace(prompt_ids=[1] * length))

    vocab = 1000
    per_row = engine.SCORING_LOGITS_BYTES // (vocab * 4)  # positions that fit
    rows = [row(per_row // 4)] * 9 + [row(per_row * 2)]
    groups = engine.scoring_groups(rows, vocab)
    assert [len(g) for g in groups] == [4, 4, 1, 1]  # the oversized row goes alone
    assert sum(groups, []) == rows
