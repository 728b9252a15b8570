"""The agent's pure rules: what a runtime can serve, read from a PEFT config and a safetensors header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tessera.adapter_format import AdapterConfig, AdapterFormatError, adapter_rank, safetensors_shapes
from tessera.adapter_format.runtime import RuntimeProfile
from tessera.agent.rules import servability_problems
from typer.testing import CliRunner

VLLM = RuntimeProfile("vllm", max_lora_rank=16, base_model="meta-llama/Llama-3.1-8B-Instruct")


def lora(module: str, rank: int, width: int = 64) -> dict[str, tuple[int, ...]]:
    prefix = f"base_model.model.model.layers.0.{module}"
    return {f"{prefix}.lora_A.weight": (rank, width), f"{prefix}.lora_B.weight": (width, rank)}


def codes(config: AdapterConfig, shapes: dict, card: dict | None = None, runtime: RuntimeProfile = VLLM) -> list[str]:
    return [code for code, _ in servability_problems(config, card or {}, shapes, runtime)]


def test_a_plain_lora_adapter_for_the_served_base_fits():
    config = AdapterConfig(r=16, target_modules=["q_proj", "v_proj"],
                           base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    assert codes(config, {**lora("self_attn.q_proj", 16), **lora("self_attn.v_proj", 16)}) == []
    # A local training path names no model: nothing to compare.
    assert codes(AdapterConfig(base_model_name_or_path="/tmp/job/base"), lora("self_attn.q_proj", 8)) == []


def test_each_thing_vllm_cannot_serve_is_named_with_the_runtime():
    found = servability_problems(
        AdapterConfig(peft_type="IA3", use_dora=True, bias="all", modules_to_save=["score"],
                      base_model_name_or_path="mistralai/Mistral-7B-v0.3"),
        {}, {**lora("self_attn.q_proj", 32), **lora("mlp.c_fc", 8), "base_model.model.score.weight": (2, 64)}, VLLM)
    assert [code for code, _ in found] == ["adapter_unsupported"] * 4 + [
        "base_model_mismatch", "target_modules_unsupported", "adapter_unsupported", "rank_too_high"]
    assert all("the vllm runtime" in message for _, message in found)
    text = " ".join(message for _, message in found)
    for field in ("peft_type IA3", "use_dora=true", "modules_to_save=['score']", "bias='all'", "['c_fc']",
                  "'mistralai/Mistral-7B-v0.3'", "score.weight", "rank 32 exceeds the maximum 16"):
        assert field in text, field


def test_the_model_card_names_the_base_before_the_peft_config():
    config = AdapterConfig(base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    assert codes(config, lora("self_attn.q_proj", 8), {"baseModel": {"name": "acme/other"}}) == ["base_model_mismatch"]
    assert codes(config, lora("self_attn.q_proj", 8), runtime=RuntimeProfile("vllm", 16)) == []  # base unknown


def test_rank_is_read_from_the_tensors_including_embedding_loras():
    shapes = {**lora("self_attn.q_proj", 8), "base_model.model.model.embed_tokens.lora_embedding_A": (32, 1000),
              "base_model.model.model.embed_tokens.lora_embedding_B": (64, 32)}
    assert adapter_rank(shapes) == 32
    with pytest.raises(AdapterFormatError, match="no LoRA"):
        adapter_rank({"base_model.model.lm_head.weight": (10, 10)})


def test_safetensors_header_is_read_without_the_weights(tmp_path: Path):
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a.lora_A.weight": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}).encode()
    good = tmp_path / "good.safetensors"
    good.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 2048)
    assert safetensors_shapes(good) == {"a.lora_A.weight": (8, 64)}
    for name, data in (("short", b"\1\2"), ("huge", struct.pack("<Q", 1 << 40)), ("text", b"\x05\0\0\0\0\0\0\0hello")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(AdapterFormatError) as error:
            safetensors_shapes(bad)
        assert error.value.code == "adapter_corrupt" and "hello" not in error.value.message


def test_bad_agent_options_are_refused_naming_the_option(tmp_path: Path):
    from tessera.cli import app

    result = CliRunner().invoke(app, ["adapter-agent", "--runtime", "tgi", "--adapters-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "--runtime" in str(result.exception) and "vllm" in str(result.exception)
