"""`tessera train`: the QLoRA training step of a FineTuneJob, in one process or under torchrun.

    result = train_job(job)     # reads jobs/<ns>/<job>/prepared, writes checkpoints/ and logs/

The same call runs on a laptop, in a PyTorchJob worker (MASTER_ADDR, RANK, WORLD_SIZE... from
the Training Operator) and under `torchrun --nproc_per_node N`. It resumes from the job's latest
complete checkpoint, so a killed or preempted worker loses at most `checkpointEverySteps` steps,
and a rerun after success does nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tessera.api import FineTuneJob
from tessera.api.records import TrainingOutcome
from tessera.job_artifacts import JobArtifacts
from tessera.train import plan
from tessera.train.checkpoint import TrainState, find_resume_point, restore, save_checkpoint
from tessera.train.distributed import Collective, DistEnv
from tessera.train.progress import ProgressReporter, progress_document

log = logging.getLogger(__name__)


def configure_threads(env: DistEnv) -> None:
    """Share the CPU cores among the processes of this machine (unless OMP_NUM_THREADS says otherwise).

    torch uses every core in every process by default; two ranks on two cores would then fight
    over them, and intra-op threads would thrash.
    """
    import torch

    from tessera.model.load import available_cores

    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(max(1, available_cores() // max(1, env.local_world_size)))


class _Batches:
    """The micro-batches of the run, in the deterministic order `plan.epoch_order` gives."""

    def __init__(self, features: list[dict[str, list[int]]], collator: Any, schedule: plan.Schedule,
                 seed: int, env: DistEnv, device: Any) -> None:
        self.features = features
        self.collator = collator
        self.schedule = schedule
        self.seed = seed
        self.env = env
        self.device = device
        self._epoch = -1
        self._order: list[int] = []

    def get(self, micro_batch: int) -> tuple[dict[str, Any], int]:
        """The n-th micro-batch of this rank (tensors on the device) and its non-padding token count."""
        epoch, index = self.schedule.position(micro_batch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = plan.epoch_order(
                len(self.features), self.seed, epoch, self.env.world_size, self.schedule.micro_batch_size
            )
        rows = plan.rank_micro_batch(
            self._order, index, self.env.rank, self.env.world_size, self.schedule.micro_batch_size
        )
        chosen = [self.features[i] for i in rows]
        tokens = sum(len(feature["input_ids"]) for feature in chosen)
        batch = self.collator(chosen)
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}, tokens


def _build_engine(model: Any, job: FineTuneJob, schedule: plan.Schedule, name: str, precision: plan.Precision,
                  hardware: plan.Hardware) -> Any:
    from tessera.train.engine import DeepSpeedEngine, TorchEngine

    if name == "deepspeed":
        return DeepSpeedEngine(model, job, schedule.total_steps, precision=precision,
                               device_type=hardware.device_type)
    return TorchEngine(model, job, schedule.total_steps)


def train_job(job: FineTuneJob, *, show_progress: bool = True, env: DistEnv | None = None) -> TrainingOutcome:
    """Train the job's adapter from its prepared data; resume from its latest checkpoint if any."""
    import torch
    from transformers import AutoTokenizer

    from tessera.data import Collator, build_features, load_prepared
    from tessera.data.prepare import TRAIN_FILE
    from tessera.train.modeling import (
        attach_lora,
        detect_hardware,
        device_for,
        fetch_base_model,
        load_base_model,
        trainable_parameters,
    )

    started = time.monotonic()
    env = env or DistEnv.from_environ()
    configure_threads(env)
    hardware = detect_hardware(env)
    plan.check_supported(job, hardware)
    engine_name = plan.choose_engine(job, hardware)
    if engine_name == "deepspeed":
        from tessera.train.engine import init_process_group

        init_process_group(env, hardware.device_type)
    precision = plan.compute_precision(job, hardware)
    artifacts = JobArtifacts.open(job)
    collective = Collective(env)
    training = job.spec.training

    prepared = load_prepared(job, artifacts.store)
    fingerprint = plan.training_fingerprint(job, prepared.manifest["files"][TRAIN_FILE])
    fingerprint["runtime"] = {"engine": engine_name, "worldSize": env.world_size}
    resumed = find_resume_point(artifacts, fingerprint, env, collective)
    if resumed is not None and resumed.step >= resumed.total_steps:
        if env.is_main:
            log.info("%s is already trained (%d steps): nothing to do", job.metadata.name, resumed.step)
        return _result(artifacts, resumed, resumed.step, engine_name, env)

    with tempfile.TemporaryDirectory(prefix="tessera-train-") as scratch:
        workdir = Path(scratch)
        # One download per machine: local rank 0 fetches, the others wait for it, then read it.
        if env.local_rank == 0:
            fetch_base_model(job)
        collective.barrier()
        model_dir = fetch_base_model(job, download=False)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        features = build_features(prepared.train, tokenizer, training.max_seq_length, training.packing)
        schedule = plan.make_schedule(job, len(features), env.world_size)

        device = device_for(hardware)
        torch.manual_seed(training.seed)
        model = load_base_model(model_dir, job, precision, device)
        model = attach_lora(model, job)
        trainable, total = trainable_parameters(model)
        engine = _build_engine(model, job, schedule, engine_name, precision, hardware)
        if env.is_main:
            log.info(
                "training %s: %d sequences, %d steps, engine %s, %d process(es), %s on %s, %d of %d parameters "
                "trainable", job.metadata.name, len(features), schedule.total_steps, engine.name, env.world_size,
                precision, hardware.device_type, trainable, total,
            )

        if resumed is not None:
            restore(artifacts, engine, resumed, env, workdir)
            if env.is_main:
                log.info("resuming %s from checkpoint step %d of %d", job.metadata.name, resumed.step,
                         schedule.total_steps)
        resumed_from = resumed.step if resumed else None
        state = resumed or TrainState(total_steps=schedule.total_steps, fingerprint=fingerprint)
        checkpoints = [artifacts.checkpoint(step) for step in artifacts.checkpoint_steps()] if env.is_main else []
        batches = _Batches(features, Collator.for_tokenizer(tokenizer), schedule, training.seed, env, device)
        state = _loop(job, engine, state, schedule, batches, artifacts, env, collective, workdir, checkpoints,
                      show_progress, started)
    return _result(artifacts, state, resumed_from, engine_name, env)


def _result(artifacts: JobArtifacts, state: TrainState, resumed_from: int | None, engine: str,
            env: DistEnv) -> TrainingOutcome:
    rates = [entry["tokensPerSecond"] for entry in state.history if entry.get("tokensPerSecond")]
    return TrainingOutcome(
        step=state.step,
        total_steps=state.total_steps,
        resumed_from=resumed_from,
        checkpoint=artifacts.checkpoint(state.step),
        train_loss=state.history[-1]["loss"] if state.history else None,
        trained_tokens=state.trained_tokens,
        device_hours=state.device_seconds / 3600,
        tokens_per_second=sum(rates) / len(rates) if rates else None,
        engine=engine,
        world_size=env.world_size,
    )


def _loop(job: FineTuneJob, engine: Any, state: TrainState, schedule: plan.Schedule, batches: _Batches,
          artifacts: JobArtifacts, env: DistEnv, collective: Collective, workdir: Path, checkpoints: list[str],
          show_progress: bool, started: float) -> TrainState:
    """Optimizer steps from `state.step` to the end; checkpoints, logs and progress on the way."""
    import torch

    training = job.spec.training
    reporter = ProgressReporter(artifacts, total_steps=schedule.total_steps, start_step=state.step,
                                show_bar=show_progress, enabled=env.is_main)
    # Sums since the last logging step; the loss stays a tensor so that no step waits on the device.
    window = {"loss": torch.zeros((), dtype=torch.float64), "micro": 0, "tokens": 0, "started": time.monotonic()}
    device_seconds_before = state.device_seconds

    def measure(step: int) -> dict[str, Any]:
        """Close the logging window: counters summed over ranks, one more point on the loss curve."""
        loss_sum, micro, tokens = collective.sum([float(window["loss"]), float(window["micro"]),
                                                  float(window["tokens"])])
        elapsed = time.monotonic() - window["started"]
        state.trained_tokens += int(tokens)
        state.device_seconds = device_seconds_before + (time.monotonic() - started) * env.world_size
        entry = {
            "step": step,
            "epoch": round(schedule.epoch_at(step), 4),
            "loss": loss_sum / micro if micro else None,
            "learningRate": engine.learning_rate,
            "tokensPerSecond": tokens / elapsed if elapsed > 0 else None,
            "tokens": int(tokens),  # trained since the last entry: with the rate, a window's duration
        }
        state.history.append(entry)
        return entry

    def report(entry: dict[str, Any]) -> None:
        reporter.report(progress_document(
            step=entry["step"], total_steps=schedule.total_steps, epoch=entry["epoch"], loss=entry["loss"],
            tokens_per_second=entry["tokensPerSecond"], eta_seconds=reporter.eta(entry["step"]),
            trained_tokens=state.trained_tokens, device_hours=state.device_seconds / 3600, checkpoints=checkpoints,
        ), state.history)
        window.update(loss=torch.zeros((), dtype=torch.float64), micro=0, tokens=0, started=time.monotonic())

    try:
        while state.step < schedule.total_steps:
            first_micro = state.step * schedule.accumulation
            for micro in range(first_micro, first_micro + schedule.accumulation):
                batch, tokens = batches.get(micro)
                window["loss"] += engine.micro_step(batch).double().cpu()
                window["micro"] += 1
                window["tokens"] += tokens
            engine.optimizer_step()
            state.step += 1
            reporter.advance()
            checkpoint_now = state.step % training.checkpoint_every_steps == 0 or state.step == schedule.total_steps
            if checkpoint_now or state.step % training.logging_steps == 0:
                entry = measure(state.step)
                if checkpoint_now:
                    key = save_checkpoint(artifacts, engine, state, env, collective, workdir)
                    if key is not None:
                        checkpoints.append(key)
                report(entry)
        collective.barrier()
    finally:
        reporter.close()
    return state
