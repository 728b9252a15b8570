"""The trainer's pure decisions: engine, precision, schedule and data order, DeepSpeed config, resume rules."""

from __future__ import annotations

from typing import Any

import pytest
from tessera.api import FineTuneJob
from tessera.errors import InvalidSpecError
from tessera.train import plan
from tessera.train.distributed import DistEnv, DistributedEnvError

CPU = plan.Hardware("cpu", bf16=True)
OLD_CPU = plan.Hardware("cpu", bf16=False)
GPU = plan.Hardware("cuda", bf16=True)


def make_job(**spec: dict[str, Any]) -> FineTuneJob:
    manifest: dict[str, Any] = {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "plan"},
        "spec": {"baseModel": {"uri": "/models/tiny"}, "dataset": {"uri": "/data/x.csv", "task": "sentiment"}},
    }
    for section, values in spec.items():
        manifest["spec"].setdefault(section, {}).update(values)
    return FineTuneJob.model_validate(manifest)


def test_deepspeed_runs_whenever_there_is_something_to_shard_or_a_gpu() -> None:
    job = make_job()
    assert plan.choose_engine(job, CPU) == "torch"
    assert plan.choose_engine(job, plan.Hardware("cpu", True, world_size=2)) == "deepspeed"
    assert plan.choose_engine(job, GPU) == "deepspeed"
    assert plan.choose_engine(make_job(training={"optimizer": "deepspeed_adam"}), CPU) == "deepspeed"


def test_compute_precision_steps_down_where_the_hardware_lacks_it() -> None:
    bf16 = make_job(baseModel={"computeDtype": "bfloat16"})
    fp16 = make_job(baseModel={"computeDtype": "float16"})
    assert plan.compute_precision(bf16, CPU) == "bfloat16"
    assert plan.compute_precision(bf16, OLD_CPU) == "float32"
    assert plan.compute_precision(bf16, plan.Hardware("cuda", bf16=False)) == "float16"
    assert plan.compute_precision(fp16, CPU) == "float32"
    assert plan.compute_precision(fp16, GPU) == "float16"


def test_unsupported_combinations_name_the_field_to_change() -> None:
    plan.check_supported(make_job(distribution={"zeroStage": 3}, baseModel={"quantization": {"bits": None}}), GPU)
    with pytest.raises(InvalidSpecError, match="spec.training.optimizer: adamw_8bit needs a CUDA GPU"):
        plan.check_supported(make_job(training={"optimizer": "adamw_8bit"}), CPU)


def test_schedule_counts_steps_from_epochs_or_max_steps() -> None:
    job = make_job(training={"batchSize": 4, "gradientAccumulationSteps": 2, "epochs": 1.5})
    schedule = plan.make_schedule(job, rows=30, world_size=2)
    assert schedule.micro_batches_per_epoch == 4  # ceil(30 / (4 * 2))
    assert schedule.steps_per_epoch == 2
    assert schedule.total_steps == 3
    assert plan.make_schedule(make_job(training={"maxSteps": 7}), rows=30, world_size=1).total_steps == 7
    # The micro-batch stream runs across epoch boundaries: step s starts at micro-batch s * accumulation.
    assert schedule.position(4) == (1, 0)
    assert schedule.position(5) == (1, 1)
    assert schedule.epoch_at(3) == 1.5
    with pytest.raises(InvalidSpecError, match="empty"):
        plan.make_schedule(job, rows=0, world_size=1)


def test_epoch_order_is_reproducible_differs_by_epoch_and_covers_every_row() -> None:
    first = plan.epoch_order(10, seed=42, epoch=0, world_size=2, micro_batch_size=4)
    assert first == plan.epoch_order(10, seed=42, epoch=0, world_size=2, micro_batch_size=4)
    assert first != plan.epoch_order(10, seed=42, epoch=1, world_size=2, micro_batch_size=4)
    assert len(first) == 16  # padded to whole micro-batches on every rank
    assert set(first) == set(range(10))


def test_ranks_read_disjoint_slices_of_each_micro_batch_round() -> None:
    order = plan.epoch_order(16, seed=1, epoch=0, world_size=2, micro_batch_size=4)
    seen = []
    for index in range(2):
        rank0 = plan.rank_micro_batch(order, index, 0, 2, 4)
        rank1 = plan.rank_micro_batch(order, index, 1, 2, 4)
        assert len(rank0) == len(rank1) == 4
        assert not set(rank0) & set(rank1)
        seen += rank0 + rank1
    assert sorted(seen) == list(range(16))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_deepspeed_config_is_accepted_by_deepspeed(stage: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    job = make_job(training={"batchSize": 4, "gradientAccumulationSteps": 2, "optimizer": "deepspeed_adam"},
                   distribution={"zeroStage": stage}, baseModel={"quantization": {"bits": None}})
    config = plan.deepspeed_config(job, "bfloat16", device_type="cpu")
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.optimizer_name == "adamw"
    assert parsed.gradient_clipping == plan.MAX_GRAD_NORM


def test_torch_optimizer_leaves_deepspeed_without_one() -> None:
    config = plan.deepspeed_config(make_job(), "float16", device_type="cuda")
    assert "optimizer" not in config
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"]


def test_fingerprint_ignores_intervals_and_lists_what_changed() -> None:
    before = plan.training_fingerprint(make_job(training={"checkpointEverySteps": 10}), "abc")
    assert before == plan.training_fingerprint(make_job(training={"checkpointEverySteps": 99, "loggingSteps": 1}),
                                               "abc")
    after = plan.training_fingerprint(make_job(training={"learningRate": 0.003}, lora={"rank": 16}), "def")
    changes = plan.fingerprint_changes(before, after)
    assert "spec.training.learningRate: 0.0001 -> 0.003" in changes
    assert "spec.lora.rank: 8 -> 16" in changes
    assert "preparedDataSha256: 'abc' -> 'def'" in changes
    assert plan.fingerprint_digest(before) != plan.fingerprint_digest(after)


def test_dist_env_reads_what_a_pytorchjob_sets() -> None:
    env = DistEnv.from_environ({"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "RANK": "3",
                                "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.distributed and not env.is_main and env.master_addr == "job-master-0"
    assert DistEnv.from_environ({}) == DistEnv()
    with pytest.raises(DistributedEnvError, match="RANK=4 does not fit WORLD_SIZE=4"):
        DistEnv.from_environ({"MASTER_ADDR": "x", "RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(DistributedEnvError, match="MASTER_ADDR is not set"):
        DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedEnvError, match="WORLD_SIZE='two'"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})
