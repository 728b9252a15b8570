"""Pure decisions of a training run: engine, precision, schedule, DeepSpeed config, spec fingerprint.

Everything here is a function of the job spec and the hardware facts passed in, so it is
unit-tested without torch doing any work, and the trainer shell stays thin.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from tessera.api import FineTuneJob
from tessera.errors import InvalidSpecError

EngineName = Literal["torch", "deepspeed"]
Precision = Literal["bfloat16", "float16", "float32"]
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Hardware:
    """What the trainer found on this machine."""

    device_type: Literal["cpu", "cuda"]
    bf16: bool  # the device computes bfloat16 natively (AVX512-BF16/AMX on CPU, Ampere+ on CUDA)
    world_size: int = 1


def choose_engine(job: FineTuneJob, hardware: Hardware) -> EngineName:
    """DeepSpeed whenever there is something for it to do, plain torch otherwise.

    ZeRO shards optimizer state and gradients across ranks, and DeepSpeed owns the bf16 mixed
    precision on CUDA; both need it. One process on a CPU has nothing to shard, and a plain
    torch loop there skips DeepSpeed's process group, flat buffers and fp32 master copy: same
    maths, less overhead. `optimizer: deepspeed_adam` asks for DeepSpeed explicitly.
    """
    if hardware.world_size > 1 or hardware.device_type == "cuda":
        return "deepspeed"
    if job.spec.training.optimizer == "deepspeed_adam":
        return "deepspeed"
    return "torch"


def compute_precision(job: FineTuneJob, hardware: Hardware) -> Precision:
    """The spec's compute dtype, stepped down where the hardware cannot do it natively.

    bf16 without hardware support is emulated (slow on CPU) or unsupported (pre-Ampere GPUs);
    float16 on CPU is slower than float32. The fallback is fp16 on CUDA, fp32 on CPU.
    """
    wanted = job.spec.base_model.compute_dtype
    if wanted == "bfloat16" and not hardware.bf16:
        return "float16" if hardware.device_type == "cuda" else "float32"
    if wanted == "float16" and hardware.device_type == "cpu":
        return "float32"
    return wanted


def check_supported(job: FineTuneJob, hardware: Hardware) -> None:
    """Refuse combinations that cannot train, naming the field to change."""
    spec = job.spec
    problems = []
    if spec.training.optimizer in ("adamw_8bit", "paged_adamw_8bit") and hardware.device_type != "cuda":
        problems.append(
            f"spec.training.optimizer: {spec.training.optimizer} needs a CUDA GPU (bitsandbytes' "
            "8-bit optimizers); on CPU use adamw_torch"
        )
    if spec.base_model.quantization.bits == 8 and hardware.device_type == "cpu" and hardware.world_size > 1:
        problems.append(
            "spec.baseModel.quantization.bits: 8-bit LLM.int8 weights cannot be trained across CPU "
            "processes by DeepSpeed; use bits 4 or null"
        )
    if problems:
        raise InvalidSpecError(problems, source=f"FineTuneJob {job.metadata.namespace}/{job.metadata.name}")


@dataclass(frozen=True)
class Schedule:
    """How many micro-batches and optimizer steps the run takes, and where each one reads data.

    The micro-batch stream runs on across epochs (gradient accumulation never restarts at an
    epoch boundary), so optimizer step `s` always consumes micro-batches
    `[s * accumulation, (s + 1) * accumulation)`: a checkpoint's step alone fixes the data position.
    """

    rows: int
    micro_batch_size: int
    world_size: int
    accumulation: int
    total_steps: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.rows / (self.micro_batch_size * self.world_size))

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_batches_per_epoch / self.accumulation

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, index of the micro-batch within that epoch) of the n-th micro-batch of the run."""
        return divmod(micro_batch, self.micro_batches_per_epoch)

    def epoch_at(self, step: int) -> float:
        """Fractional epoch reached after `step` optimizer steps (what progress reports)."""
        return step * self.accumulation / self.micro_batches_per_epoch


def make_schedule(job: FineTuneJob, rows: int, world_size: int) -> Schedule:
    """The run's schedule: `maxSteps` when set (as Hugging Face's TrainingArguments), else epochs."""
    training = job.spec.training
    if rows < 1:
        raise InvalidSpecError(["spec.dataset: the prepared training split is empty"])
    schedule = Schedule(rows, training.batch_size, world_size, training.gradient_accumulation_steps, 1)
    total = training.max_steps or max(1, math.ceil(training.epochs * schedule.steps_per_epoch))
    return Schedule(rows, training.batch_size, world_size, training.gradient_accumulation_steps, total)


def epoch_order(rows: int, seed: int, epoch: int, world_size: int, micro_batch_size: int) -> list[int]:
    """The row order of one epoch, padded by wrapping round to fill every rank's last micro-batch.

    The same (seed, epoch) gives the same order on every rank and after a resume, which is what
    makes a resumed run see exactly the data an uninterrupted one would.
    """
    import random

    order = list(range(rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_round = micro_batch_size * world_size
    padded = math.ceil(rows / per_round) * per_round
    return [order[i % rows] for i in range(padded)]


def rank_micro_batch(order: list[int], index: int, rank: int, world_size: int, micro_batch_size: int) -> list[int]:
    """Rows of micro-batch `index` of an epoch for `rank`: consecutive slices, one per rank."""
    start = (index * world_size + rank) * micro_batch_size
    return order[start : start + micro_batch_size]


def deepspeed_config(job: FineTuneJob, precision: Precision, *, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config the spec asks for (ZeRO stage, precision, batch sizes, optimizer).

    The LR scheduler is Tessera's own (passed to `deepspeed.initialize`), so warmup and decay are
    the same on every engine. `train_batch_size` is left for DeepSpeed to derive from the world size.
    """
    training = job.spec.training
    stage = job.spec.distribution.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero |= {"overlap_comm": device_type == "cuda", "contiguous_gradients": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bfloat16"},
        "fp16": {"enabled": precision == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # Tessera reports progress itself
        "wall_clock_breakdown": False,
    }
    if training.optimizer == "deepspeed_adam":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        }
    return config


# Fields that change what a checkpoint means. Logging and checkpoint intervals, evaluation,
# serving and output do not, so they may change between a kill and a resume.
_RESUME_IRRELEVANT = {"checkpoint_every_steps", "logging_steps"}


def training_fingerprint(job: FineTuneJob, dataset_sha256: str | None) -> dict[str, Any]:
    """What a checkpoint was trained with; a resume must match it."""
    spec = job.spec
    return {
        "spec": {
            "baseModel": spec.base_model.model_dump(mode="json", by_alias=True),
            "lora": spec.lora.model_dump(mode="json", by_alias=True),
            "training": spec.training.model_dump(mode="json", by_alias=True, exclude=_RESUME_IRRELEVANT),
        },
        "preparedDataSha256": dataset_sha256,
    }


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any], path: str = "") -> list[str]:
    """Human-readable `path: old -> new` lines for every leaf that differs."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{path}.{key}" if path else key
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(fingerprint_changes(a, b, where))
        elif a != b:
            changes.append(f"{where}: {a!r} -> {b!r}")
    return changes
