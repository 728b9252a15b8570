"""Checkpoints in the store, and resuming from the latest one after a kill.

`jobs/<ns>/<job>/checkpoints/step-N/`, published atomically (a kill mid-upload leaves nothing a
resume would take for a checkpoint):

    adapter/               the adapter after step N, a standard PEFT directory (evaluate/publish use it)
    engine/                optimizer + LR schedule (+ exact fp32 adapter weights), one file set per rank
    rng/rank-<r>.json      every rank's RNG states (LoRA dropout continues the same)
    state.json             step, trained tokens, device seconds, loss history, training fingerprint

The data position needs no file: it follows from the step (see `plan.Schedule`).

Nothing read back can run code: whoever can write the job's prefix could otherwise run code in its
training pod, with its credentials, on the next resume. RNG states are JSON (numbers only), the
engine's files load with `torch.load(weights_only=True)` (DeepSpeed's too: see
`engine.load_weights_only`), the adapter is safetensors. A checkpoint from before this rule
(rng/rank-<r>.pt, a pickle) resumes without its RNG states rather than unpickle them.
"""

from __future__ import annotations

import json
import logging
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
log = logging.getLogger(__name__)
RNG_DIR = "rng"
LEGACY_RNG_SUFFIX = ".pt"


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


def rng_state() -> dict[str, Any]:
    """Every RNG's state as JSON-able numbers (no pickle: reading it back cannot run code)."""
    import numpy as np
    import torch

    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(position), "hasGauss": int(has_gauss),
                  "cachedGaussian": float(cached)},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    python, numpy = state["python"], state["numpy"]
    random.setstate((int(python["version"]), tuple(int(w) for w in python["state"]), python["gauss"]))
    np.random.set_state((str(numpy["kind"]), np.asarray(numpy["keys"], dtype=np.uint32), int(numpy["pos"]),
                         int(numpy["hasGauss"]), float(numpy["cachedGaussian"])))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
    local = workdir / f"checkpoint-{state.step}-rank-{env.rank}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    try:
        engine.save(local / ENGINE_DIR)
        engine.save_adapter(local / ADAPTER_DIR, is_main=env.is_main)
        (local / RNG_DIR).mkdir(exist_ok=True)
        (local / RNG_DIR / f"rank-{env.rank}.json").write_text(json.dumps(rng_state()))
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
    local = workdir / f"resume-{state.step}-rank-{env.rank}"
    shutil.rmtree(local, ignore_errors=True)
    try:
        artifacts.store.get_dir(artifacts.key(artifacts.checkpoint(state.step)), local)
        engine.load(local / ENGINE_DIR)
        rng_file = local / RNG_DIR / f"rank-{env.rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        elif rng_file.with_suffix(LEGACY_RNG_SUFFIX).is_file():
            log.warning("checkpoint step-%d keeps its RNG states as a pickle, which is never read (it could "
                        "carry code): dropout after the resume differs from an uninterrupted run", state.step)
    finally:
        shutil.rmtree(local, ignore_errors=True)
