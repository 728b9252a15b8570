"""Progress for a person (a tqdm bar on rank 0) and for the operator (JSON in the store).

`jobs/<ns>/<job>/logs/progress.json` (the shared contract) is rewritten at every logging step;
`logs/train-log.jsonl` holds the loss curve, one line per logging step, continued across resumes.
Under Kubeflow Trainer v2 the same document also goes to the TrainJob's status (trainer_status.py).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from tessera.api import paths
from tessera.job_artifacts import JobArtifacts
from tessera.train.trainer_status import TrainerStatusReporter

TRAIN_LOG = "train-log.jsonl"


def train_log_key(artifacts: JobArtifacts) -> str:
    return f"{paths.logs_prefix(artifacts.job)}/{TRAIN_LOG}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def progress_document(
    *,
    step: int,
    total_steps: int,
    epoch: float,
    loss: float | None,
    tokens_per_second: float | None,
    eta_seconds: float | None,
    trained_tokens: int,
    device_hours: float,
    checkpoints: list[str],
) -> dict[str, Any]:
    """The progress JSON of the shared contract."""
    return {
        "step": step,
        "totalSteps": total_steps,
        "epoch": round(epoch, 4),
        "percent": round(100.0 * step / total_steps, 2) if total_steps else 0.0,
        "loss": loss,
        "tokensPerSecond": None if tokens_per_second is None else round(tokens_per_second, 1),
        "etaSeconds": None if eta_seconds is None else round(eta_seconds, 1),
        "trainedTokens": trained_tokens,
        "deviceHours": round(device_hours, 6),
        "checkpoints": checkpoints,
        "updatedAt": utc_now(),
    }


class ProgressReporter:
    """Rank 0's view of the run: the bar every step, the store at logging steps and checkpoints."""

    def __init__(
        self, artifacts: JobArtifacts, *, total_steps: int, start_step: int, show_bar: bool, enabled: bool
    ) -> None:
        self.artifacts = artifacts
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.monotonic()
        self.trainer_status = TrainerStatusReporter.from_environ() if enabled else None
        self.bar = None
        if enabled and show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=f"train {artifacts.job.metadata.name}",
                unit="step", dynamic_ncols=True,
            )

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total_steps - step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, document: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Publish the progress JSON and the loss curve (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None and document.get("loss") is not None:
            self.bar.set_postfix(loss=f"{document['loss']:.4f}", tok_s=f"{document['tokensPerSecond'] or 0:.0f}")
        store = self.artifacts.store
        store.put_json(self.artifacts.key(paths.progress_key(self.artifacts.job)), document)
        lines = "".join(json.dumps(entry) + "\n" for entry in history)
        store.put_bytes(self.artifacts.key(train_log_key(self.artifacts)), lines.encode())
        if self.trainer_status is not None:
            self.trainer_status.report(document, final=document["step"] >= document["totalSteps"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
