"""Helpers shared by the server tests and the serving benchmark's test: adapters, a server handle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_NAME = "tessera/tiny-llama"  # the tiny model's upstream name: adapters are checked against it
BASE_NAME = "tiny-llama"  # its name on KServe routes (which cannot address a slash); OpenAI routes take it too
S3_BUCKET = "serve-adapters"
MAX_LORA_RANK = 16
MAX_LORAS = 4


def make_adapter(base_dir: Path, out: Path, *, seed: int, rank: int = 8, base_name: str = TINY_NAME,
                 scale: float = 0.3, targets: list[str] = ALL_TARGETS) -> Path:
    """A random PEFT LoRA adapter on `base_dir` whose zero-initialised half is perturbed (so it changes
    outputs): B of a linear LoRA, A of an embedding LoRA (`embed_tokens` in `targets`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                parameter.normal_(std=scale)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(out)
    return out


def train_label_adapter(base_dir: Path, out: Path, label: str, steps: int = 10) -> Path:
    """A sentiment adapter trained until it answers `label` to any news text (seconds on a CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tessera.data.template import encode_example
    from tessera.tasks import get_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS, lora_dropout=0.0),
    )
    task = get_task("sentiment")
    texts = ["Profit rose 20% in Q3.", "The company cut 300 jobs.", "Sales were flat.", "Nokia signs a deal."]
    encoded = [encode_example(task.to_example({"text": text, "label": label}), tokenizer) for text in texts]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, trained) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor([i if t else -100 for i, t in zip(ids, trained, strict=True)])
        attention[row, : len(ids)] = 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.peft_config["default"].base_model_name_or_path = TINY_NAME
    model.save_pretrained(out)
    (out / "model-card.json").write_text(json.dumps({"task": "sentiment", "baseModel": {"name": TINY_NAME}}))
    return out


def other_base_model(path: Path) -> Path:
    """A different small LLaMA (other widths, other name): adapters made on it must be refused."""
    from tessera.model.tiny import init_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    init_tiny(path)  # reuse its tokenizer and identity files, then replace the weights
    config = LlamaConfig(vocab_size=2272, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "tessera.json").write_text(json.dumps({"name": "acme/other-llama", "seed": 0}))
    return path


def s3_environment(endpoint: str) -> dict[str, str]:
    """How a pod's Secret points the store at S3; here at the session's moto server."""
    return {
        "S3_ENDPOINT": endpoint.removeprefix("http://"),
        "S3_USE_HTTPS": "0",
        "AWS_ACCESS_KEY_ID": "serve-test",
        "AWS_SECRET_ACCESS_KEY": "serve-test-secret",  # noqa: S105 - a test server's key
        "AWS_DEFAULT_REGION": "us-east-1",
        "TESSERA_STORE_RETRY_SECONDS": "5",
    }



@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path
    adapters_root: Path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:  # noqa: S310 - loopback
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, path: str, body: dict | bytes) -> tuple[int, Any]:
        """Status and body: parsed JSON, or text (vLLM's adapter API answers success in plain text)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback
            self.url + path, data=data, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


@contextmanager
def serving(model: Path | str, workdir: Path, *options: str) -> Iterator[str]:
    """A ready `tessera serve` process on 127.0.0.1 (free port, log in `workdir`); yields its URL."""
    from tessera.serve.readiness import wait_until_ready

    from tests.processes import stop

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tessera", "serve", "--model", str(model), "--port", str(port), *options],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, timeout=180)
        yield url
    finally:
        stop(process)
