"""The tiny base model loads through the standard Hugging Face entry points, also in 4-bit on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny")


def test_loads_with_auto_classes_and_has_quantizable_shapes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size >= len(tokenizer)
    for module_name, module in model.named_modules():
        if type(module).__name__ == "Linear":
            assert module.in_features % 32 == 0 and module.out_features % 32 == 0, module_name
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert json.loads((tiny_dir / "tessera.json").read_text())["name"] == "tessera/tiny-llama"


def test_tokenizer_keeps_label_words_whole_and_round_trips(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for word in ["negative", "neutral", "positive", "buy", "sell", "hold", "yes", "no", "up", "down"]:
        assert len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1, word
    text = "Nordea's net sales rose 12.5% to EUR 3,401 million — ünïcode too."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_follows_llama3(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Up or down?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nUp or down?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith("<|end_header_id|>\n\n")


def test_loads_in_4bit_on_cpu_and_generates(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    inputs = tokenizer("Gold prices rose", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs.input_ids.shape[1] + 5 or tokenizer.eos_token_id in output[0].tolist()


def test_init_is_deterministic_and_idempotent(tiny_dir, tmp_path):
    from tessera.model.tiny import init_tiny

    other = init_tiny(tmp_path / "again")
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    before = (other / "model.safetensors").stat().st_mtime_ns
    init_tiny(other)
    assert (other / "model.safetensors").stat().st_mtime_ns == before
    reseeded = init_tiny(tmp_path / "seed1", seed=1)
    assert (reseeded / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


CLI = [sys.executable, "-c", "from tessera.cli import main; main()"]


def test_cli_init_tiny_is_idempotent_and_upload_refuses_a_non_model(tiny_dir, tmp_path):
    result = subprocess.run([*CLI, "model", "init-tiny", str(tiny_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    result = subprocess.run([*CLI, "model", "upload", str(not_a_model), str(tmp_path / "store" / "m")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "config.json" in result.stderr and "Traceback" not in result.stderr


def test_upload_to_s3_and_fetch_back(tiny_dir, tmp_path, s3_env, s3_bucket):
    """`tessera model upload` into S3 (moto's server standing in for MinIO), read back with the store."""
    import shutil

    from tessera.model import base_model_name
    from tessera.store import fetch, local_manifest

    model = shutil.copytree(tiny_dir, tmp_path / "llama")
    uri = f"s3://{s3_bucket}/models/llama-3.1-8b-instruct"
    result = subprocess.run([*CLI, "model", "upload", str(model), uri, "--name", "meta-llama/Llama-3.1-8B-Instruct"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    copy = fetch(uri, tmp_path / "copy")
    assert local_manifest(copy) == local_manifest(model)
    assert base_model_name(copy) == "meta-llama/Llama-3.1-8B-Instruct"
