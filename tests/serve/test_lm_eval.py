"""lm-evaluation-harness (`local-completions`, the model type practitioners point at a vLLM server)
scoring `tessera serve`: a multiple-choice task scored by loglikelihood (`echo` with prompt logprobs)
and a generate_until task. Offline: the tasks are YAML over a local JSON file, the tokenizer is the
tiny model's directory, nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import math
import socket

import pytest

pytestmark = pytest.mark.slow

DOCS = [
    {"text": "Profit rose 20% on strong demand.", "label": 2, "answer": "positive"},
    {"text": "The bank cut its dividend.", "label": 0, "answer": "negative"},
    {"text": "Sales were flat in the quarter.", "label": 1, "answer": "neutral"},
    {"text": "Nokia signs a five-year deal with a carrier.", "label": 2, "answer": "positive"},
]
PROMPT = "News: {{text}}\nSentiment:"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    data = root / "news.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              f"doc_to_text: {json.dumps(PROMPT)}\n")
    (root / "mc.yaml").write_text(
        "task: tessera_news_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_choice: ["negative", "neutral", "positive"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: tessera_news_gen\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection off this machine fails the test: the harness must run offline."""
    connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and sock.family != socket.AF_UNIX:
            raise AssertionError(f"lm-eval tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_lm_eval_harness_scores_through_the_server(server, tiny_base, startup_adapter, task_dir, monkeypatch,
                                                   loopback_only):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    lm = LocalCompletionsAPI(
        model="startup", base_url=f"{server.url}/v1/completions", tokenizer=str(tiny_base),
        tokenizer_backend="huggingface", tokenized_requests=True, batch_size=3, max_retries=1, max_length=256,
    )
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)  # indexing lm-eval's own takes ~20 s
    output = simple_evaluate(
        model=lm, tasks=["tessera_news_mc", "tessera_news_gen"], task_manager=tasks,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    assert output is not None
    results = output["results"]
    assert 0.0 <= results["tessera_news_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["tessera_news_gen"]["exact_match,none"] <= 1.0
    assert len(output["samples"]["tessera_news_gen"]) == len(DOCS)

    # Every loglikelihood the server returned equals the adapter's own, computed with peft.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), startup_adapter).eval()
    compared = 0
    for sample in output["samples"]["tessera_news_mc"]:
        for (context, continuation), ((served, _),) in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            ids = torch.tensor([context_ids + continuation_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(reference(input_ids=ids).logits[0].float(), dim=-1)
            expected = sum(float(logprobs[len(context_ids) + i - 1, token])
                           for i, token in enumerate(continuation_ids))
            assert math.isfinite(served) and served == pytest.approx(expected, abs=1e-3)
            compared += 1
    assert compared == 3 * len(DOCS)
