"""`torchrun --nproc_per_node 2` (gloo, CPU) trains one adapter with DeepSpeed ZeRO-2, against S3.

Stand-ins: two CPU processes on one machine for two PyTorchJob workers (torchrun sets the same
MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK the Training Operator does); moto's S3 server
for MinIO, spoken to through the minio SDK as in a cluster.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import run_tessera

pytestmark = pytest.mark.slow


def test_two_process_torchrun_trains_and_publishes_one_adapter_to_s3(job_file, s3_env, s3_bucket) -> None:
    """`tessera run` with `distribution.workers: 2` starts `torchrun --nproc_per_node=2 -m tessera train`."""
    from peft import PeftModel
    from tessera.store import fetch, open_store
    from transformers import AutoModelForCausalLM

    job = job_file(name="ddp", rows=96, distribution={"workers": 2},
                   store={"uri": f"s3://{s3_bucket}/tessera", "credentialsSecret": "tessera-store"})
    result = run_tessera("run", "-f", job, "--json", "--no-progress", timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout)
    training = outcome["training"]
    assert training["engine"] == "deepspeed" and training["worldSize"] == 2

    store, root = open_store(f"s3://{s3_bucket}/tessera")
    checkpoint = f"{root}/{training['checkpoint']}"
    files = {key.removeprefix(checkpoint + "/") for key in store.list(checkpoint)}
    # One checkpoint holding both ranks' ZeRO-2 optimizer shards, gathered by rank 0.
    assert {"engine/deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "engine/deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng/rank-0.json", "rng/rank-1.json", "adapter/adapter_model.safetensors", "state.json"} <= files

    record = outcome["published"]
    assert record["uri"] == outcome["adapterUri"]
    assert record["uri"].startswith(f"s3://{s3_bucket}/tessera/adapters/default/ddp/")
    assert len(store.list(f"{root}/adapters/default/ddp", recursive=False)) == 1
    assert outcome["evaluation"]["adapter"]["accuracy"] is not None

    with tempfile.TemporaryDirectory() as scratch:
        adapter_dir = fetch(record["uri"], scratch)
        base_dir = yaml.safe_load(job.read_text())["spec"]["baseModel"]["uri"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        assert any("lora_A" in name for name, _ in model.named_parameters())
        card = json.loads((Path(adapter_dir) / "model-card.json").read_text())
        assert card["training"]["steps"] == training["step"]
        assert card["hyperparameters"]["distribution"]["workers"] == 2
