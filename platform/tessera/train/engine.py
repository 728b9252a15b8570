"""Two ways to run the same optimisation: a plain torch loop, or DeepSpeed.

Both take micro-batches, accumulate gradients, clip, step the optimizer and Tessera's LR
schedule, and save or restore their state in a directory. `plan.choose_engine` picks one.
Imported by the trainer only, inside `train_job`: this module needs torch at import time.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tessera.api import FineTuneJob
from tessera.train.distributed import DistEnv
from tessera.train.plan import MAX_GRAD_NORM, Precision, deepspeed_config

TORCH_STATE_FILE = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"
IGNORE_INDEX = -100
# Architectures whose logits are exactly `lm_head(last_hidden_state)`: no softcapping, no logit
# scale. Others run their own forward, with logits for every position.
PLAIN_LM_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


class AnswerLoss(torch.nn.Module):
    """The causal-LM loss of a batch, as the model's own forward computes it, but cheaper.

    With prompt masking only a few tokens per example are answers, yet a causal LM projects
    every position onto the whole vocabulary (128k entries for Llama 3) before the loss masks
    almost all of it away. This projects the answer positions only: the same loss and gradients
    for a fraction of the largest matmul and of its activation memory.
    """

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        self.peft_model = peft_model
        config = peft_model.get_base_model().config
        self.selective = config.model_type in PLAIN_LM_HEAD_MODELS and not getattr(
            config, "final_logit_softcapping", None
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        if not self.selective:
            return self.peft_model(input_ids=input_ids, labels=labels, use_cache=False, **inputs).loss
        causal_lm = self.peft_model.get_base_model()
        hidden = causal_lm.model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
        targets = labels[:, 1:]
        answer = targets != IGNORE_INDEX
        logits = causal_lm.lm_head(hidden[:, :-1][answer])
        return F.cross_entropy(logits.float(), targets[answer])


def make_optimizer(job: FineTuneJob, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    training = job.spec.training
    if training.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(parameters, lr=training.learning_rate, weight_decay=0.0)
    # fused: one kernel over all the small LoRA tensors instead of a loop of tiny ones.
    return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=0.0, fused=True)


def make_scheduler(job: FineTuneJob, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    training = job.spec.training
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[training.lr_scheduler]
    warmup = int(training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class TorchEngine:
    """One process, plain torch: the LoRA parameters stay fp32, the frozen base computes in its dtype."""

    name = "torch"

    def __init__(self, model: Any, job: FineTuneJob, total_steps: int) -> None:
        self.module = model
        self.network = AnswerLoss(model)
        self.accumulation = job.spec.training.gradient_accumulation_steps
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(job, self.parameters)
        self.scheduler = make_scheduler(job, self.optimizer, total_steps)
        model.train()

    def micro_step(self, batch: dict[str, Any]) -> Any:
        loss = self.network(**batch)
        (loss / self.accumulation).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {name: p.detach() for name, p in self.module.named_parameters() if p.requires_grad}
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                # The exact weights: the PEFT copy in adapter/ may be saved in a lower precision.
                "trainable": trainable,
            },
            directory / TORCH_STATE_FILE,
        )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / TORCH_STATE_FILE, map_location="cpu", weights_only=True)
        parameters = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                parameters[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_adapter(self, directory: Path, *, is_main: bool) -> None:
        if is_main:
            self.module.save_pretrained(directory)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_process_group(env: DistEnv, device_type: str) -> None:
    """DeepSpeed's process group: NCCL on GPUs, gloo on CPUs (no oneCCL needed)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if not env.distributed:
        # DeepSpeed wants a process group even alone; give it a private loopback rendezvous.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)


# The only classes DeepSpeed's checkpoints hold besides tensors and containers (found by loading the
# checkpoints of ZeRO 0-2, fp32 and bf16, with weights_only=True): plain data, rebuilt without calling
# anything else. Any other global is refused by name: the resume fails, nothing runs.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load` of a checkpoint file that cannot run code: tensors, containers and the plain
    DeepSpeed classes above only (DeepSpeed's checkpoint engine's `load`, made safe)."""
    import importlib

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the spec) with bf16/fp16 mixed precision where the hardware has it.

    Needs the process group (`init_process_group`) first.
    """

    name = "deepspeed"

    def __init__(self, model: Any, job: FineTuneJob, total_steps: int, *, precision: Precision,
                 device_type: str) -> None:
        import deepspeed

        config = deepspeed_config(job, precision, device_type=device_type)
        parameters = [p for p in model.parameters() if p.requires_grad]
        client_optimizer = None if "optimizer" in config else make_optimizer(job, parameters)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=AnswerLoss(model),
            model_parameters=parameters,
            optimizer=client_optimizer,
            lr_scheduler=lambda optimizer: make_scheduler(job, optimizer, total_steps),
            config=config,
        )
        self.module = model
        self.engine.train()

    def micro_step(self, batch: dict[str, Any]) -> Any:
        loss = self.engine(**batch)
        # DeepSpeed divides by the accumulation steps itself and steps at the boundary only.
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Nothing left to do: `engine.step()` in the last micro-step crossed the boundary."""

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        # Only the adapter is trainable: leave the frozen (possibly 8B) base out of every checkpoint.
        self.engine.save_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False
        )

    def save_adapter(self, directory: Path, *, is_main: bool) -> None:
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            # ZeRO-3 holds a slice of each adapter weight per rank: gather them (a collective).
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if is_main:
                    self.module.save_pretrained(directory)
        elif is_main:
            self.module.save_pretrained(directory)

    def load(self, directory: Path) -> None:
        # DeepSpeed's own loader unpickles any object a file holds: every file of ours goes through
        # `load_weights_only` instead, so a planted pickle fails to load rather than runs.
        self.engine.checkpoint_engine.load = load_weights_only
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
