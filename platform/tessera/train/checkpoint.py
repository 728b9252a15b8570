"""Checkpoints in the store, and resuming from the latest one after a kill.

`jobs/<ns>/<job>/checkpoints/step-N/`, published atomically (a kill mid-upload leaves nothing a
resume would take for a checkpoint):

    adapter/               the adapter after step N, a standard PEFT directory (evaluate/publish use it)
    engine/                optimizer + LR schedule (+ exact fp32 adapter weights), one file set per rank
    rng/rank-<r>.pt        every rank's RNG states (LoRA dropout continues the same)
    state.json             step, trained tokens, device seconds, loss history, training fingerprint

The data position needs no file: it follows from the step (see `plan.Schedule`).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.job_artifacts import JobArtifacts
from tessera.train.distributed import Collective, DistEnv
from tessera.train.plan import fingerprint_changes

STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"
ENGINE_DIR = "engine"
RNG_DIR = "rng"


class ResumeMismatchError(TesseraError):
    """The job's checkpoints were made by a different training setup than this run's."""


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer: counters and the loss curve so far."""

    step: int = 0
    total_steps: int = 0
    trained_tokens: int = 0
    device_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            "step": data["step"],
            "totalSteps": data["total_steps"],
            "trainedTokens": data["trained_tokens"],
            "deviceSeconds": data["device_seconds"],
            "history": data["history"],
            "fingerprint": data["fingerprint"],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            step=int(data["step"]),
            total_steps=int(data.get("totalSteps", 0)),
            trained_tokens=int(data.get("trainedTokens", 0)),
            device_seconds=float(data.get("deviceSeconds", 0.0)),
            history=list(data.get("history", [])),
            fingerprint=dict(data.get("fingerprint", {})),
        )


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _files_under(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def save_checkpoint(
    artifacts: JobArtifacts,
    engine: Any,
    state: TrainState,
    env: DistEnv,
    collective: Collective,
    workdir: Path,
) -> str | None:
    """Write and publish step `state.step`'s checkpoint. Every rank calls it; rank 0 publishes.

    Returns the checkpoint's relative key on rank 0, None on the others.
    """
    import torch

    local = workdir / f"checkpoint-{state.step}-rank-{env.rank}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    try:
        engine.save(local / ENGINE_DIR)
        engine.save_adapter(local / ADAPTER_DIR, is_main=env.is_main)
        (local / RNG_DIR).mkdir(exist_ok=True)
        torch.save(_rng_state(), local / RNG_DIR / f"rank-{env.rank}.pt")
        # Rank 0 already holds its own files; only the other ranks' shards travel.
        others = collective.gather_files({} if env.is_main else _files_under(local))
        if not env.is_main:
            return None
        for name, data in (others or {}).items():
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (local / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))
        key = artifacts.checkpoint(state.step)
        artifacts.store.publish_dir(local, artifacts.key(key))
        return key
    finally:
        shutil.rmtree(local, ignore_errors=True)


def load_state(artifacts: JobArtifacts, step: int) -> TrainState:
    """The `state.json` of the checkpoint at `step`."""
    return TrainState.from_json(artifacts.store.get_json(artifacts.key(f"{artifacts.checkpoint(step)}/{STATE_FILE}")))


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse to resume from checkpoints made with another setup, listing what changed."""
    changes = fingerprint_changes(saved, current)
    if changes:
        raise ResumeMismatchError(
            f"the checkpoints under {where} were trained with a different setup:\n"
            + "\n".join(f"  - {change}" for change in changes)
            + "\nput the old values back to resume, or start over: delete that prefix "
            "(`tessera store rm -r`) or give the job a new metadata.name"
        )


def find_resume_point(
    artifacts: JobArtifacts, fingerprint: dict[str, Any], env: DistEnv, collective: Collective
) -> TrainState | None:
    """The state of the latest complete checkpoint (None when there is none), checked against this
    run's setup before anything heavy is loaded."""
    steps = artifacts.checkpoint_steps() if env.is_main else None
    latest = collective.broadcast(steps[-1] if steps else None)
    if latest is None:
        return None
    state = load_state(artifacts, latest)
    check_resumable(state.fingerprint, fingerprint, artifacts.uri(artifacts.checkpoint(latest)))
    return state


def restore(artifacts: JobArtifacts, engine: Any, state: TrainState, env: DistEnv, workdir: Path) -> None:
    """Load the checkpoint of `state.step` into `engine` (weights, optimizer, schedule) and the RNGs."""
    import torch

    local = workdir / f"resume-{state.step}-rank-{env.rank}"
    shutil.rmtree(local, ignore_errors=True)
    try:
        artifacts.store.get_dir(artifacts.key(artifacts.checkpoint(state.step)), local)
        engine.load(local / ENGINE_DIR)
        rng_file = local / RNG_DIR / f"rank-{env.rank}.pt"
        # Our own file from the checkpoint just written by this job; RNG states are not plain tensors.
        _set_rng_state(torch.load(rng_file, weights_only=False))
    finally:
        shutil.rmtree(local, ignore_errors=True)
