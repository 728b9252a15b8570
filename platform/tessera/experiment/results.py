"""What a finished cell produced, read back from the store: its model card, evaluation and loss curve.

`read_cell_result` is the one reader of a cell's published records (model card, evaluation report,
training log): the report, the selection, the embedded runner and the operator all take its
`CellResult`, so the records' owners can change their shape in one place.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tessera.api import FineTuneJob, paths
from tessera.api.adapter_dir import MODEL_CARD_FILE, ModelCard
from tessera.api.records import PublishedRecord
from tessera.errors import TesseraError
from tessera.job_artifacts import JobArtifacts
from tessera.store import Store, join_key, open_store


class CurvePoint(BaseModel):
    step: int
    tokens: int
    loss: float


class CellResult(BaseModel):
    """A row of the comparison: one cell's settings, scores, costs and curve (camelCase in JSON)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    name: str
    values: dict[str, Any] = Field(default_factory=dict)
    repeat: int = 0
    phase: str = "Succeeded"
    reason: str | None = None
    adapter_uri: str | None = None
    base_model: str | None = None
    dataset_sha256: str | None = None
    task: str | None = None
    metric: str | None = None
    samples: int | None = None
    adapter_scores: dict[str, Any] = Field(default_factory=dict)
    base_scores: dict[str, Any] = Field(default_factory=dict)
    majority: dict[str, Any] | None = None
    train_loss_final: float | None = None
    train_loss_mean: float | None = None
    trained_tokens: int | None = None
    steps: int | None = None
    tokens_per_second: float | None = None
    device_hours: float | None = None
    cost: float | None = None
    currency: str = "USD"
    adapter_bytes: int | None = None
    wall_seconds: float | None = None
    curve: list[CurvePoint] = Field(default_factory=list)

    def score(self, metric: str) -> float | None:
        value = self.adapter_scores.get(metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def eval_loss(self) -> float | None:
        return self.score("eval_loss")

    @property
    def seconds_per_example(self) -> float | None:
        return self.score("secondsPerExample")


def read_cell_result(job: FineTuneJob, *, values: dict[str, Any] | None = None, repeat: int = 0,
                     wall_seconds: float | None = None, artifacts: JobArtifacts | None = None) -> CellResult:
    """The published cell `job`: `published.json` -> its adapter's model card and size, the training log.

    `artifacts` is the job's store opened by the caller (the operator opens it with the job's Secret)."""
    artifacts = artifacts or JobArtifacts.open(job)
    key = artifacts.key(paths.published_key(job))
    record = PublishedRecord.read(artifacts.store.get_json(key), key)
    adapter_key = artifacts.key(paths.adapter_prefix(job.metadata.namespace, record.name, record.version))
    return read_published(artifacts.store, adapter_key,
                          training_log(artifacts.store, artifacts.key(paths.logs_prefix(job))),
                          name=job.metadata.name, values=values, repeat=repeat, wall_seconds=wall_seconds)


def read_adapter_result(uri: str) -> CellResult:
    """Any published adapter, from its URI: its model card, and the loss curve of the job its lineage names
    when that job's logs are still in the same store (what `tessera compare` reads)."""
    store, key = open_store(uri)
    parts = key.split("/")
    if len(parts) < 4 or parts[-4] != "adapters":
        raise TesseraError(f"{uri} is not a published adapter (expected .../adapters/<namespace>/<name>/<version>)")
    root = "/".join(parts[:-4])
    card = ModelCard.read(store.get_json(f"{key}/{MODEL_CARD_FILE}"))
    job = ((card.lineage or {}).get("job") or "").split("/")
    entries = training_log(store, join_key(root, f"jobs/{job[0]}/{job[1]}/logs")) if len(job) == 2 else []
    return read_published(store, key, entries, name=f"{card.name}@{card.version}", card=card)


def read_published(store: Store, adapter_key: str, entries: list[dict[str, Any]], *, name: str,
                   values: dict[str, Any] | None = None, repeat: int = 0, wall_seconds: float | None = None,
                   card: ModelCard | None = None) -> CellResult:
    """The row of one published adapter directory: its model card, its size, its training log entries."""
    card = card or ModelCard.read(store.get_json(f"{adapter_key}/{MODEL_CARD_FILE}"))
    sizes = [store.stat(key) for key in store.list(adapter_key)]
    metrics = card.metrics or {}
    training = card.training or {}
    cost = card.cost or {}
    curve = loss_curve(entries)
    losses = [point.loss for point in curve]
    return CellResult(
        name=name,
        values=values or {},
        repeat=repeat,
        adapter_uri=store.uri(adapter_key),
        base_model=card.base_model_name,
        dataset_sha256=(card.dataset or {}).get("sha256"),
        task=card.task,
        metric=metrics.get("metric"),
        samples=metrics.get("samples"),
        adapter_scores=dict(metrics.get("adapter") or {}),
        base_scores=dict(metrics.get("base") or {}),
        majority=metrics.get("majority"),
        train_loss_final=training.get("trainLoss"),
        train_loss_mean=sum(losses) / len(losses) if losses else None,
        trained_tokens=training.get("trainedTokens"),
        steps=training.get("steps"),
        tokens_per_second=tokens_per_second(entries),
        device_hours=training.get("deviceHours"),
        cost=cost.get("amount"),
        currency=cost.get("currency") or "USD",
        adapter_bytes=sum(info.size for info in sizes if info is not None) or None,
        wall_seconds=wall_seconds,
        curve=curve,
    )


def training_log(store: Store, logs_key: str) -> list[dict[str, Any]]:
    """The trainer's log in a job's `logs/` directory: one entry per logging window (step, loss, tokens
    trained in it, tokens/s); empty when the job left none."""
    from tessera.train.progress import TRAIN_LOG

    key = f"{logs_key}/{TRAIN_LOG}"
    if not store.exists(key):
        return []
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines() if line.strip()]


def loss_curve(entries: list[dict[str, Any]]) -> list[CurvePoint]:
    """The loss against the tokens trained so far."""
    points, tokens = [], 0
    for entry in entries:
        tokens += int(entry.get("tokens") or 0)
        if entry.get("loss") is not None:
            points.append(CurvePoint(step=entry["step"], tokens=tokens, loss=float(entry["loss"])))
    return points


def tokens_per_second(entries: list[dict[str, Any]]) -> float | None:
    """Training throughput over the logged windows (each window's duration is its tokens over its rate)."""
    windows = [(e["tokens"], e["tokens"] / e["tokensPerSecond"]) for e in entries
               if e.get("tokens") and e.get("tokensPerSecond")]
    seconds = sum(s for _, s in windows)
    return sum(t for t, _ in windows) / seconds if seconds > 0 else None
