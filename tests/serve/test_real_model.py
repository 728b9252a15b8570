"""`tessera serve` on the real pretrained base (SmolLM2-135M-Instruct, imported from its GGUF file):
served under its upstream name, answering in English with the real tokenizer and chat template
through the OpenAI SDK, and classifying through KServe v1 with the adapter's task prompt."""

from __future__ import annotations

import json

import pytest

from tests.real_model import SMOLLM2_DIR, SMOLLM2_NAME, needs_smollm2
from tests.serve.helpers import make_adapter, serving

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    import httpx

    root = tmp_path_factory.mktemp("real-adapters")
    # LoRA B left at zero: the adapter answers as the base does, so the test checks the serving path
    # (prompt format, tokenizer, parsing) on a real model rather than what a training run learnt.
    adapter = make_adapter(SMOLLM2_DIR, root / "zero", seed=0, base_name=SMOLLM2_NAME, scale=0.0)
    (adapter / "model-card.json").write_text(json.dumps({"task": "sentiment", "baseModel": {"name": SMOLLM2_NAME}}))
    with serving(SMOLLM2_DIR, root, "--allowed-prefix", str(root), "--cache-dir", str(root / "cache")) as url:
        body = {"lora_name": "fin-sentiment", "lora_path": str(adapter)}
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
        assert loaded.status_code == 200, loaded.text
        yield url


def test_the_base_is_served_under_its_upstream_name(real_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{real_server}/openai/v1", api_key="unused")
    names = {model.id for model in client.models.list()}
    assert SMOLLM2_NAME in names and "fin-sentiment" in names
    assert not any(name.startswith((".", "/")) or "smollm2-135m-instruct" == name for name in names)


def test_openai_chat_answers_in_english_with_the_real_chat_template(real_server):
    from openai import OpenAI
    from tessera.tasks import get_task

    client = OpenAI(base_url=f"{real_server}/openai/v1", api_key="unused")
    answer = client.chat.completions.create(
        model=SMOLLM2_NAME, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    ).choices[0].message.content
    assert "paris" in answer.lower()
    task = get_task("sentiment")
    prompt = task.to_example({"text": "Profits soar 40% and the company raises its dividend", "label": "positive"})
    reply = client.chat.completions.create(
        model="fin-sentiment", max_tokens=16, temperature=0, messages=[{"role": "user", "content": prompt.prompt}],
    ).choices[0].message.content
    assert task.parse(reply) == "positive", reply


def test_kserve_v1_predict_uses_the_adapters_task_prompt(real_server):
    import httpx

    response = httpx.post(
        f"{real_server}/v1/models/fin-sentiment:predict",
        json={"instances": ["Shares plunge 30% after the bank discloses massive losses and a fraud probe",
                            "Record profits: revenue up 50%, shares soar to an all-time high"]},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == ["negative", "positive"], response.json()
