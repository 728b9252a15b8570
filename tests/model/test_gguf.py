"""GGUF import: bad files get a clear error naming the file and the reason; the real SmolLM2 file
becomes a Hugging Face directory once, whether imported by hand or named by a FineTuneJob."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.real_model import SMOLLM2_GGUF, SMOLLM2_NAME, needs_smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_gguf(path: Path, architecture: str) -> Path:
    """A small, valid GGUF file (one tensor) written with the gguf package, as llama.cpp's tools do."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say about it)."""
    whole = write_gguf(tmp / "whole.gguf", "llama").read_bytes()
    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(whole[: len(whole) // 2])
    text = tmp / "notes.gguf"
    text.write_text("AWS_SECRET_ACCESS_KEY=do-not-print-me\n" * 20)
    return {
        "truncated": (truncated, "truncated or corrupt"),
        "not gguf": (text, "is not a GGUF file"),
        "unsupported architecture": (write_gguf(tmp / "bert.gguf", "bert"), "architecture 'bert' is not supported"),
        "no tokenizer": (tmp / "whole.gguf", "transformers cannot convert it"),
        "missing": (tmp / "absent.gguf", "does not exist"),
    }


@pytest.mark.parametrize("case", ["truncated", "not gguf", "unsupported architecture", "no tokenizer", "missing"])
def test_bad_gguf_files_are_refused_by_name_with_the_reason(tmp_path, case):
    source, expected = bad_files(tmp_path)[case]
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tessera", "model", "import", str(source), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert source.name in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "do-not-print-me" not in result.stderr + result.stdout  # no file content in the error
    assert not out.exists()  # nothing half-written where the model was meant to go
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # staging cleaned up


@needs_smollm2_gguf
def test_a_job_naming_a_gguf_base_converts_it_once_into_a_real_model(tmp_path, monkeypatch):
    """`baseModel.format: gguf`: the step finds the GGUF file, converts it into the cache, reuses it."""
    from tessera.api import FineTuneJob
    from tessera.train.modeling import fetch_base_model
    from transformers import AutoConfig, AutoTokenizer

    holder = tmp_path / "models" / "smollm2-gguf"
    holder.mkdir(parents=True)
    (holder / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    job = FineTuneJob.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gguf-base"},
        "spec": {
            "baseModel": {"uri": str(holder), "name": SMOLLM2_NAME, "format": "gguf", "quantization": {"bits": None}},
            "dataset": {"uri": "data.csv", "task": "sentiment"},
            "store": {"uri": str(tmp_path / "store")},
        },
    })
    converted = fetch_base_model(job)
    assert converted != holder and (converted / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(converted)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49152)
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert json.loads((converted / "tessera.json").read_text())["name"] == SMOLLM2_NAME
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(converted).chat_template
    written = (converted / "model.safetensors").stat().st_mtime_ns
    assert fetch_base_model(job) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == written  # converted once, then reused
