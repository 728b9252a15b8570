"""The records one step writes and another reads, across processes: the training outcome, the evaluation
report (`jobs/<ns>/<job>/eval/report.json`), the publish record (`jobs/<ns>/<job>/published.json`) and
the embedded run's outcome. The model card is `tessera.api.adapter_dir.ModelCard`.

One owner each: the step writes `record.to_json()`, every reader (operator, embedded runner, CLI,
the Experiment report) calls `Record.read(document)`. Rules for a record written by another version:
- a key this version does not know is kept (it round-trips) and otherwise ignored, so a newer
  writer may add fields: extend these models by adding fields, never by renaming or retyping one;
- a field without a default is required: a record without it is refused with a `RecordError`
  naming the field (never its value); a field with a default (None unless stated) may be absent.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from tessera.errors import TesseraError

Scores = dict[str, Any]  # metric name -> number (or a nested table such as `per_class`)


def field_problems(error: ValidationError) -> str:
    """`field: rule` for each field pydantic refused, never the value it was given."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}"
                     for e in error.errors(include_url=False, include_input=False, include_context=False))


class RecordError(TesseraError, ValueError):
    """A stored record is not what this version can read (another tool wrote it, or it is damaged)."""


class Record(BaseModel):
    """camelCase on the wire; unknown keys kept. `kind` and `file` name the record in errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    kind: ClassVar[str] = ""
    file: ClassVar[str] = ""

    @classmethod
    def read(cls, document: Any, source: str = "") -> Self:
        """The record in a parsed JSON document; RecordError naming each bad field."""
        what = f"{source or cls.file or 'the document'} is not a valid {cls.kind or cls.__name__}"
        if not isinstance(document, dict):
            raise RecordError(f"{what}: expected a JSON object")
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            raise RecordError(f"{what}: {field_problems(error)}") from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class TrainingOutcome(Record):
    """What `tessera train` reports when training ends (rank 0; `--result` writes it)."""

    step: int
    total_steps: int
    resumed_from: int | None = None
    checkpoint: str  # relative key of the final checkpoint
    train_loss: float | None = None
    trained_tokens: int = 0
    device_hours: float = 0.0
    tokens_per_second: float | None = None
    engine: str
    world_size: int = 1


class MajorityBaseline(Record):
    label: str
    accuracy: float


class EvaluationReport(Record):
    """`tessera evaluate`'s report: base vs adapter on the held-out rows, the checkpoint chosen."""

    task: str
    metric: str  # the headline metric: promotion and the checkpoint choice read it
    adapter: Scores
    base: Scores | None = None  # None when spec.evaluation.compareWithBase is false
    improvement: float | None = None
    majority: MajorityBaseline | None = None
    samples: int = Field(ge=0)
    labels: dict[str, int] | None = None
    samples_per_second: float | None = None
    seconds_per_example: float | None = None
    data: str = "eval split"
    adapter_uri: str | None = None
    checkpoint: str | None = None  # relative key of the checkpoint chosen (None: an adapter given by URI)
    checkpoints: dict[str, float | None] | None = None  # checkpoint -> its headline metric
    # A teacher-labelled job's teacher vs student on human-labelled rows (tessera.evaluate.distillation).
    distillation: dict[str, Any] | None = None

    def score(self, side: str, metric: str | None = None) -> float | None:
        """`side` ("adapter" or "base") on `metric` (default: the headline), None when not a number."""
        value = (getattr(self, side) or {}).get(metric or self.metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class PublishedBaseModel(Record):
    uri: str
    name: str | None = None


class PublishedRecord(Record):
    """`published.json`: where `tessera publish` put the adapter, and what the Adapter resource carries."""

    name: str
    version: str
    uri: str
    sha256: str
    base_model: PublishedBaseModel
    task: str
    rank: int = Field(ge=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_sha256: str | None = None
    checkpoint: str
    trained_tokens: int = 0
    device_hours: float = 0.0
    cost: dict[str, Any] | None = None


class RunOutcome(Record):
    """The embedded runner's result (`tessera run --json`): every step's record."""

    job: str  # namespace/name
    adapter_uri: str
    published: PublishedRecord
    training: TrainingOutcome
    evaluation: EvaluationReport | None = None
