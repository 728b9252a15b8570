"""Experiment: a FineTuneJob template, a matrix of named axes over its paths, and how to pick the winner.

The matrix is a CI matrix (GitHub Actions' `strategy.matrix`): the product of the axes' values,
minus every `exclude` entry that matches, plus every `include` entry as a cell of its own. Its
expansion is this type's validation (a bad path, a cell that breaks a FineTuneJob rule, or more
cells than the installation allows are refused here, before anything runs), so it lives with the
type; `tessera.experiment` builds the cells' jobs, the selection and the report on top of it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tessera.api.base import API_VERSION, Condition, KubeModel, NamedResource, ObjectMeta
from tessera.api.finetunejob import METRIC_NAMES, FineTuneJobSpec

# The installation's cap on cells per experiment (the chart sets it on the operator and CLI).
MAX_CELLS_ENV = "TESSERA_EXPERIMENT_MAX_CELLS"
DEFAULT_MAX_CELLS = 32
# A cell's job is `<experiment>-<8 hex>`, and a DNS label holds 63 characters.
CELL_HASH_CHARS = 8
MAX_EXPERIMENT_NAME = 63 - CELL_HASH_CHARS - 1
# Lower is better for these metrics; higher for every other.
LOWER_IS_BETTER = ("mse", "eval_loss")

ExperimentPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
# A Katib trial's FineTuneJob carries its parameters here, as JSON `{path: value}` (see `trial_overrides`).
TRIAL_PARAMETERS_ANNOTATION = "experiment.tessera.dev/trial-parameters"
AXIS_NAME = r"^[a-z][a-zA-Z0-9]{0,30}$"


def max_cells() -> int:
    """The configured cap on cells (`TESSERA_EXPERIMENT_MAX_CELLS`, default 32)."""
    raw = os.environ.get(MAX_CELLS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_CELLS


class Axis(KubeModel):
    """One named dimension of the matrix: a FineTuneJob spec path and the values it takes."""

    name: str = Field(pattern=AXIS_NAME, description="Label of the axis in tables and job labels, e.g. rank.")
    path: str = Field(min_length=1, description="Path in the FineTuneJob spec, e.g. lora.rank or baseModel.")
    values: list[Any] | None = Field(
        None, description="The values of a grid (any YAML: numbers, null, a whole baseModel mapping).")
    min: float | None = Field(None, description="Search only: lower bound of a numeric range (Katib feasibleSpace).")
    max: float | None = Field(None, description="Search only: upper bound of a numeric range.")
    step: float | None = Field(None, gt=0, description="Search only: step of a numeric range.")
    distribution: Literal["uniform", "logUniform"] | None = Field(None, description="Search only: how Katib samples.")

    @model_validator(mode="after")
    def _values_or_range(self) -> Axis:
        if self.values is None and (self.min is None or self.max is None):
            raise ValueError("values: give the axis a list of values (or min and max for a search)")
        if self.values is not None and len(self.values) == 0:
            raise ValueError("values: must have at least 1 item(s)")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError("max: must be greater than min")
        return self


class Matrix(KubeModel):
    """Named axes; `exclude` drops the cells an entry matches, `include` adds whole cells."""

    axes: list[Axis] = Field(min_length=1)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)


class JobTemplateMeta(KubeModel):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class JobTemplate(KubeModel):
    """The FineTuneJob every cell starts from (its spec); the matrix overrides paths of it."""

    metadata: JobTemplateMeta = Field(default_factory=JobTemplateMeta)
    spec: FineTuneJobSpec


class Budgets(KubeModel):
    """Limits a cell must meet to be eligible; a cell over any budget cannot win."""

    max_cost: float | None = Field(None, ge=0, description="In the template's cost currency.")
    max_device_hours: float | None = Field(None, ge=0)
    max_adapter_bytes: int | None = Field(None, ge=1)
    max_seconds_per_example: float | None = Field(
        None, gt=0, description="Evaluation latency of the adapter: seconds per held-out example.")


class Selection(KubeModel):
    """The rule that picks the winner: the best held-out metric among the cells within budget."""

    metric: str = Field("accuracy", description=f"One of {', '.join(METRIC_NAMES)}.")
    goal: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: minimize for mse and eval_loss, maximize otherwise.")
    budgets: Budgets = Field(default_factory=Budgets)

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRIC_NAMES:
            raise ValueError(f"unknown metric {value!r}; known: {', '.join(METRIC_NAMES)}")
        return value

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize" if self.goal else self.metric not in LOWER_IS_BETTER


class SearchSpec(KubeModel):
    """A search over the axes, delegated to Katib (`kubeflow.org/v1beta1`) where the chart enables it."""

    algorithm: Literal["random", "bayesianoptimization", "tpe"] = "random"
    max_trials: int = Field(8, ge=1, le=1000)
    max_failed_trials: int | None = Field(None, ge=0)


class Cell(BaseModel):
    """One point of the matrix: its axis values, the spec paths they set, and the repeat's seed."""

    values: dict[str, Any]
    overrides: dict[str, Any]
    repeat: int = 0

    def name(self, experiment: str) -> str:
        """`<experiment>-<8 hex>` from the cell's overrides: stable across restarts and reorderings."""
        digest = hashlib.sha256(json.dumps([self.overrides, self.repeat], sort_keys=True).encode()).hexdigest()
        return f"{experiment}-{digest[:CELL_HASH_CHARS]}"

    def describe(self) -> str:
        text = ", ".join(f"{k}={short_value(v)}" for k, v in self.values.items())
        return f"{text}, repeat {self.repeat}" if self.repeat else text


class ExperimentSpec(KubeModel):
    """A grid (or a Katib search) of FineTuneJobs from one template, and the rule that picks the winner."""

    template: JobTemplate
    matrix: Matrix
    max_parallel: int = Field(1, ge=1, le=256, description="FineTuneJobs running at once (the team's GPU quota).")
    repeats: int = Field(1, ge=1, le=10, description="Runs of each cell under seeds seed, seed+1, ...")
    selection: Selection = Field(default_factory=Selection)
    promote: bool = Field(False, description="Serve the winner's adapter (and only the winner's).")
    search: SearchSpec | None = Field(None, description="Delegate to Katib instead of running the grid.")

    @model_validator(mode="after")
    def _valid_matrix(self) -> ExperimentSpec:
        problem = matrix_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def cells(self) -> list[Cell]:
        """Every cell of the grid, in matrix order (axes' product, then includes), each repeat after the other."""
        return expand(self)

    def cell_spec(self, cell: Cell) -> FineTuneJobSpec:
        """The template with the cell's paths set."""
        document = self.template.spec.model_dump(by_alias=True, mode="json", exclude_unset=True)
        for path, value in cell.overrides.items():
            set_path(document, path, value)
        return FineTuneJobSpec.model_validate(document)


class CellStatus(KubeModel):
    """A row of the experiment's table."""

    name: str
    values: dict[str, Any] = Field(default_factory=dict)
    repeat: int = 0
    phase: str = "Pending"
    score: float | None = None
    cost: float | None = None
    device_hours: float | None = None
    wall_seconds: float | None = None
    adapter_uri: str | None = None
    reason: str | None = None


class Winner(KubeModel):
    cell: str
    score: float | None = None
    adapter_uri: str | None = None
    reason: str = ""


class ExperimentStatus(KubeModel):
    phase: ExperimentPhase = "Pending"
    cells_total: int = 0
    cells_done: int = 0
    cells: list[CellStatus] = Field(default_factory=list)
    best_cell: str | None = None
    best_score: float | None = None
    cost_so_far: float = 0.0
    currency: str = "USD"
    winner: Winner | None = None
    report_uri: str | None = None
    katib_experiment: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class Experiment(NamedResource):
    """A comparison of FineTuneJobs across bases, settings and costs, with the winner picked by a rule."""

    api_version: Literal["tessera.dev/v1alpha1"] = API_VERSION
    kind: Literal["Experiment"] = "Experiment"
    spec: ExperimentSpec
    status: ExperimentStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _name_leaves_room_for_cells(cls, metadata: ObjectMeta) -> ObjectMeta:
        if len(metadata.name) > MAX_EXPERIMENT_NAME:
            raise ValueError(f"name: at most {MAX_EXPERIMENT_NAME} characters (cell jobs add -<8 hex>)")
        return metadata



# --- paths and expansion -------------------------------------------------------------------------


def set_path(document: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way (a whole mapping replaces the old one)."""
    keys = path.split(".")
    node = document
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def path_problem(path: str, model: type[BaseModel] = FineTuneJobSpec) -> str | None:
    """Why `path` names no field of the FineTuneJob spec (None when it does)."""
    current: Any = model
    for index, key in enumerate(path.split(".")):
        if current is dict:
            return None  # a key of a mapping field (columns, labelMap, nodeSelector): any name
        fields = {field.alias or name: field for name, field in current.model_fields.items()}
        if key not in fields:
            known = ", ".join(sorted(fields))
            where = ".".join(path.split(".")[:index]) or "the spec"
            return f"{path!r} is not a field: {where} has no {key!r} (it has {known})"
        current = _field_type(fields[key].annotation)
        if current is None and index < len(path.split(".")) - 1:
            return f"{path!r} is not a field: {key!r} holds a value, not a mapping"
    return None


def _field_type(annotation: Any) -> Any:
    """The model class or `dict` a field holds (through Optional), None for a plain value."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        if candidate is dict or typing.get_origin(candidate) is dict:
            return dict
    return None


def expand(spec: ExperimentSpec) -> list[Cell]:
    axes = spec.matrix.axes
    grid = [dict(zip([a.name for a in axes], combo, strict=True))
            for combo in itertools.product(*[a.values or [] for a in axes])]
    grid = [cell for cell in grid if not any(_matches(cell, entry) for entry in spec.matrix.exclude)]
    for entry in spec.matrix.include:
        if entry not in grid:
            grid.append({a.name: entry[a.name] for a in axes})
    paths = {a.name: a.path for a in axes}
    base_seed = spec.template.spec.training.seed
    cells = []
    for values in grid:
        overrides = {paths[name]: value for name, value in values.items()}
        for repeat in range(spec.repeats):
            extra = {"training.seed": base_seed + repeat} if spec.repeats > 1 else {}
            cells.append(Cell(values=values, overrides={**overrides, **extra}, repeat=repeat))
    return cells


def _matches(cell: dict[str, Any], entry: dict[str, Any]) -> bool:
    return all(cell.get(key) == value for key, value in entry.items())


def matrix_problem(spec: ExperimentSpec) -> str | None:
    """The first thing wrong with the matrix, as `field: rule` relative to the spec; None if valid."""
    axes = spec.matrix.axes
    names = [a.name for a in axes]
    for index, axis in enumerate(axes):
        if names.count(axis.name) > 1:
            return f"matrix.axes.{index}.name: axis {axis.name!r} is named twice"
        problem = path_problem(axis.path)
        if problem:
            return f"matrix.axes.{index}.path: {problem}"
        if axis.path == "training.seed" and spec.repeats > 1:
            return f"matrix.axes.{index}.path: training.seed is set by repeats; use one or the other"
        if spec.search is None and axis.values is None:
            return f"matrix.axes.{index}.values: a grid needs values (min and max are for spec.search)"
    if len({a.path for a in axes}) < len(axes):
        return "matrix.axes: two axes set the same path"
    for kind, entries in (("exclude", spec.matrix.exclude), ("include", spec.matrix.include)):
        for index, entry in enumerate(entries):
            unknown = [key for key in entry if key not in names]
            if unknown:
                return f"matrix.{kind}.{index}: {unknown[0]!r} is not an axis (axes: {', '.join(names)})"
            missing = [name for name in names if name not in entry]
            if kind == "include" and missing:
                return (f"matrix.{kind}.{index}: an included cell gives every axis a value "
                        f"(missing: {', '.join(missing)})")
    if spec.search is not None:
        for index, axis in enumerate(axes):
            odd = [v for v in axis.values or [] if v is None or isinstance(v, (dict, list, bool))]
            if odd:
                return (f"matrix.axes.{index}.values: a search samples numbers or strings (Katib's feasibleSpace); "
                        f"{short_value(odd[0])} is neither")
        return None  # Katib draws the trials; there is no grid to expand or cap.
    sizes = [len(a.values or []) for a in axes]
    if _product(sizes) > 100_000:
        return f"matrix: {' x '.join(map(str, sizes))} cells is more than {max_cells()} allowed"
    cells = expand(spec)
    limit = max_cells()
    if not cells:
        return "matrix: the excludes leave no cell"
    if len(cells) > limit:
        return (f"matrix: {len(cells)} cells ({len(cells) // spec.repeats} x {spec.repeats} repeats) is more than "
                f"the {limit} this installation allows ({MAX_CELLS_ENV})")
    for cell in cells:
        try:
            spec.cell_spec(cell)
        except ValidationError as error:
            from tessera.api.loader import describe_errors

            first = describe_errors(FineTuneJobSpec, error)[0]
            return f"matrix: the cell {cell.describe()} makes an invalid FineTuneJob: {first}"
    return None


def _product(sizes: list[int]) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


def short_value(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name") or value.get("uri") or json.dumps(value, sort_keys=True))
    return "null" if value is None else str(value)


def trial_overrides(annotations: dict[str, str]) -> dict[str, Any]:
    """The `{path: value}` a Katib trial sets, from its FineTuneJob's annotation ({} when it is not a trial).

    Katib fills `${trialParameters.x}` into the trial template as text: inside this JSON annotation a
    number stays a number, where in the spec itself it would become the string "8"."""
    raw = annotations.get(TRIAL_PARAMETERS_ANNOTATION)
    if not raw:
        return {}
    try:
        overrides = json.loads(raw)
    except ValueError:
        raise ValueError(f"{TRIAL_PARAMETERS_ANNOTATION}: not valid JSON") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{TRIAL_PARAMETERS_ANNOTATION}: must be a JSON object of path: value")
    for path in overrides:
        problem = path_problem(path)
        if problem:
            raise ValueError(f"{TRIAL_PARAMETERS_ANNOTATION}: {problem}")
    return overrides
