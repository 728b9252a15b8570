"""What a FineTuneJob's status should say, from what the operator observed: pure functions.

The handlers gather the observations (the Workflow, the training job, the trainer's progress file,
the evaluation report, the publish record) and patch whatever these functions return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.api import FineTuneJob, FineTuneJobStatus
from tessera.api.records import EvaluationReport, PublishedRecord
from tessera.evaluate.report import improvement
from tessera.redact import redact

STEPS = ("label", "prepare", "train", "evaluate", "publish")
# The label step (spec.dataset.teacher) readies the data, as prepare does: the job is Validating meanwhile.
STEP_PHASE = {"label": "Validating", "prepare": "Validating", "train": "Training", "evaluate": "Evaluating",
              "publish": "Publishing"}
STEP_CONDITION = {"label": "DataLabelled", "prepare": "DataPrepared", "train": "Trained", "evaluate": "Evaluated",
                  "publish": "Published"}
STEP_FAILURE = {"label": "LabelFailed", "prepare": "PrepareFailed", "train": "TrainingFailed",
                "evaluate": "EvaluationFailed", "publish": "PublishFailed"}

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", redact(self.message))


@dataclass(frozen=True)
class Observation:
    """Everything the operator read about one job in one look."""

    workflow: dict[str, Any] | None = None
    training_job: dict[str, Any] | None = None  # the PyTorchJob or the TrainJob
    progress: dict[str, Any] | None = None
    report: EvaluationReport | None = None
    published: PublishedRecord | None = None


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str
    message: str


@dataclass
class StatusUpdate:
    """The status fields to patch and the Events that explain the change."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


def condition(type_: str, status: bool, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": redact(message)}


def merge_conditions(old: list[dict[str, Any]], new: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    """Conditions by type, keeping `lastTransitionTime` unless the condition's status changed."""
    merged = {c["type"]: dict(c) for c in old}
    for cond in new:
        previous = merged.get(cond["type"])
        changed = previous is None or previous.get("status") != cond["status"]
        merged[cond["type"]] = {
            **cond,
            "lastTransitionTime": now if changed else previous.get("lastTransitionTime", now),
        }
    return list(merged.values())


def step_nodes(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Workflow's node for each top-level step, by step name (the outermost node wins over retries)."""
    nodes: dict[str, dict[str, Any]] = {}
    for node in (workflow.get("status", {}).get("nodes") or {}).values():
        name = node.get("displayName")
        if name in STEPS and (name not in nodes or node.get("type") == "Retry"):
            nodes[name] = node
    return nodes


def promotion(job: FineTuneJob, report: EvaluationReport | None) -> Promotion:
    """Whether the adapter is served: the job's rule applied to its evaluation report."""
    serving = job.spec.serving
    if not serving.enabled:
        return Promotion(False, "ServingDisabled", "spec.serving.enabled is false: the adapter is published, "
                                                   "not served")
    rule = serving.promotion
    if not rule.enabled:
        return Promotion(True, "PromotionDisabled", "no promotion rule: the adapter is served")
    metric = rule.metric
    adapter = report.score("adapter", metric) if report else None
    base = report.score("base", metric) if report else None
    if adapter is None:
        return Promotion(False, "MetricMissing", f"the evaluation report has no adapter {metric}: not served")
    if base is None:
        promoted = rule.min_improvement <= 0
        return Promotion(promoted, "NoBaseline" if promoted else "MetricMissing",
                         f"adapter {metric}={adapter:.4g}; no base {metric} to compare with "
                         f"(minImprovement {rule.min_improvement:g})")
    gain = improvement(metric, {metric: base}, {metric: adapter})
    promoted = gain >= rule.min_improvement
    return Promotion(
        promoted,
        "BeatBase" if promoted else "BelowPromotionThreshold",
        f"adapter {metric}={adapter:.4g}, base {metric}={base:.4g}, improvement {gain:+.4g} "
        f"{'>=' if promoted else '<'} minImprovement {rule.min_improvement:g}",
    )


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _progress_fields(job: FineTuneJob, progress: dict[str, Any] | None, done: bool) -> dict[str, Any]:
    if not progress:
        return {"progress": {"percent": 100.0}} if done else {}
    out: dict[str, Any] = {
        "progress": {
            "percent": 100.0 if done else float(min(max(progress.get("percent") or 0.0, 0.0), 100.0)),
            "step": int(progress.get("step") or 0),
            "totalSteps": progress.get("totalSteps"),
            "epoch": progress.get("epoch"),
            "etaSeconds": 0.0 if done else progress.get("etaSeconds"),
        },
        "checkpoints": list(progress.get("checkpoints") or []),
    }
    if progress.get("trainedTokens") is not None:
        out["trainedTokens"] = int(progress["trainedTokens"])
    if progress.get("deviceHours") is not None:
        hours = float(progress["deviceHours"])
        out["gpuHours"] = hours
        out["cost"] = {"amount": round(hours * job.spec.cost.price_per_device_hour, 6),
                       "currency": job.spec.cost.currency}
    return out


def _metrics(progress: dict[str, Any] | None, report: EvaluationReport | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if progress and isinstance(progress.get("loss"), int | float):
        metrics["trainLoss"] = float(progress["loss"])
    if report:
        adapter, base = _numbers(report.adapter), _numbers(report.base)
        metrics["adapter"], metrics["base"] = adapter, base
        if "eval_loss" in adapter:
            metrics["evalLoss"] = adapter["eval_loss"]
    return {"metrics": metrics} if metrics else {}


def _phase_and_conditions(obs: Observation) -> tuple[str, list[dict[str, str]], dict[str, str] | None]:
    """Phase, step conditions and (on failure) the error, from the Workflow's nodes."""
    workflow = obs.workflow or {}
    wf_status = workflow.get("status") or {}
    wf_phase = wf_status.get("phase")
    if (workflow.get("spec") or {}).get("shutdown") and wf_phase in ("Failed", "Error", "Succeeded"):
        return "Cancelled", [], {"code": "Cancelled", "message": wf_status.get("message") or "the workflow was stopped"}
    nodes = step_nodes(workflow)
    conditions = []
    running = None
    for step in STEPS:
        node = nodes.get(step)
        if node is None:
            continue
        phase = node.get("phase")
        if phase == "Succeeded":
            conditions.append(condition(STEP_CONDITION[step], True, f"{step.capitalize()}Succeeded"))
        elif phase in ("Failed", "Error"):
            message = node.get("message") or wf_status.get("message") or f"the {step} step failed"
            conditions.append(condition(STEP_CONDITION[step], False, STEP_FAILURE[step], message))
            return "Failed", conditions, {"code": STEP_FAILURE[step], "message": message}
        elif phase in ("Running", "Pending"):
            running = step
    if wf_phase in ("Failed", "Error"):
        message = wf_status.get("message") or "the workflow failed"
        return "Failed", conditions, {"code": "WorkflowFailed", "message": message}
    if wf_phase == "Succeeded":
        return "Publishing", conditions, None  # Succeeded only once the publish record is read
    return (STEP_PHASE[running] if running else "Queued"), conditions, None


def _training_failure(training_job: dict[str, Any] | None) -> str | None:
    """Why the training job failed: both kinds say so with a `Failed` condition."""
    for cond in ((training_job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return cond.get("message") or f"the {training_job.get('kind', 'training job')} failed"
    return None


def derive_status(job: FineTuneJob, current: dict[str, Any], obs: Observation, now: str) -> StatusUpdate:
    """The status after this observation, and Events for what changed since `current`."""
    phase, step_conditions, error = _phase_and_conditions(obs)
    if phase == "Publishing" and obs.published:
        phase = "Succeeded"
    training_failure = _training_failure(obs.training_job)
    if training_failure and (phase == "Training" or (error and error["code"] == "TrainingFailed")):
        # The training operator says why (Argo's node only says which condition matched).
        phase, error = "Failed", {"code": "TrainingFailed", "message": training_failure}
        step_conditions = [c for c in step_conditions if c["type"] != "Trained"]
        step_conditions.append(condition("Trained", False, "TrainingFailed", training_failure))
    done = phase == "Succeeded"
    status: dict[str, Any] = {"phase": phase}
    status |= _progress_fields(job, obs.progress, done)
    status |= _metrics(obs.progress, obs.report)
    new_conditions = list(step_conditions)
    if phase == "Succeeded" and obs.published is not None:
        published = obs.published
        status["adapterRef"] = {"name": published.name, "uri": published.uri}
        new_conditions.append(condition("Succeeded", True, "AdapterPublished",
                                        f"adapter {published.name} version {published.version} at {published.uri}"))
        status["completionTime"] = current.get("completionTime") or now
    if phase in ("Failed", "Cancelled") and error:
        status["error"] = error
        new_conditions.append(condition(phase, True, error["code"], error["message"]))
        status["completionTime"] = current.get("completionTime") or now
    status["conditions"] = merge_conditions(current.get("conditions") or [], new_conditions, now)
    known = {f.alias or name for name, f in FineTuneJobStatus.model_fields.items()}
    status = FineTuneJobStatus.model_validate({**{k: v for k, v in current.items() if k in known},
                                               **status}).to_wire()
    return StatusUpdate(status=status, events=_transition_events(current.get("phase"), phase, error))


def _transition_events(old: str | None, new: str, error: dict[str, str] | None) -> list[Event]:
    if old == new:
        return []
    if new in ("Failed", "Cancelled") and error:
        return [Event("Warning", error["code"], error["message"])]
    messages = {
        "Validating": "preparing the dataset",
        "Training": "training started",
        "Evaluating": "evaluating the adapter against the base model",
        "Publishing": "publishing the adapter",
        "Succeeded": "the adapter is published",
    }
    return [Event("Normal", new, messages.get(new, new.lower()))] if new in messages else []


def changed_fields(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The top-level status fields of `desired` that differ from `current` (what to patch)."""
    return {k: v for k, v in desired.items() if current.get(k) != v}
