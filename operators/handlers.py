"""The kopf handlers: FineTuneJob → Workflow → Adapter → hot-loaded into the InferenceService.

Run with `tessera operator` (or `kopf run -m tessera_operator.handlers`). Each handler is a small
shell: it reads what it needs, asks the pure builders (`builders`, `status`, `serving`) what the
world should look like, and writes that. Errors are sorted in one place (`_failing`):
transient API or store trouble → `kopf.TemporaryError` (kopf retries with backoff); a refused
object → the job ends Failed with a reason and a Warning Event, never a crash loop.

Why a spec change after submission is refused rather than reverted: the job's steps read the
spec frozen into its ConfigMap at submission, so the running job cannot be changed anyway.
Reverting the user's edit would fight any GitOps tool that re-applies it; instead the update
handler records a `SpecChangeRefused` condition, emits a Warning Event and raises
`kopf.PermanentError` (no retries). `metadata.generation` then runs ahead of
`status.observedGeneration`, which is how `kubectl` users see that their edit was not applied.
A job that never got submitted (an invalid spec) is validated again on every spec change, so
fixing it with `kubectl apply` starts it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterator
from typing import Any

import kopf
from tessera.api import API_VERSION, GROUP, VERSION, Adapter, FineTuneJob, parse_resource
from tessera.api import TERMINAL_PHASES as TERMINAL
from tessera.api.records import RecordError
from tessera.errors import InvalidSpecError, StoreError
from tessera.redact import install_log_redaction, redact
from tessera.safe_yaml import safe_load
from tessera_operator.artifacts import read_job_artifacts
from tessera_operator.builders import (
    ISVC_LABEL,
    JOB_CONFIG_KEY,
    TRAINING_KINDS,
    build_adapter,
    build_inference_service,
    build_job_configmap,
    build_workflow,
    effective_job,
    launcher_of,
    owner_reference,
    submitted_generation,
    training_job_name,
    workflow_name,
)
from tessera_operator.config import OperatorConfig
from tessera_operator.kube import Kube, Rejected, Transient, load_config
from tessera_operator.serving import (
    AdapterApi,
    AdapterApiError,
    Backoff,
    adapter_phase,
    replicas_from_pods,
    sync_replica,
)
from tessera_operator.status import (
    Event,
    Observation,
    changed_fields,
    condition,
    derive_status,
    merge_conditions,
    promotion,
    step_nodes,
)

FINETUNEJOBS = (GROUP, VERSION, "finetunejobs")
ADAPTERS = (GROUP, VERSION, "adapters")
CONFIG = OperatorConfig.from_env()
SECRET_TTL_SECONDS = 300.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress and the last-handled spec go to annotations: a real API server prunes
    # unknown status fields, and the CRD's status schema has no room for kopf's bookkeeping.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.reporting_component = "tessera-operator"
    # The client logs response bodies at DEBUG, Secrets included: never let them reach a log.
    logging.getLogger("kubernetes.client.rest").setLevel(logging.INFO)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    settings.execution.max_workers = 16
    install_log_redaction()  # kopf's handlers are on the root logger by now
    install_log_redaction(logging.getLogger("kopf.objects"))  # kopf posts these records as Events
    memo.config = CONFIG
    memo.kube = Kube(load_config())
    memo.adapter_api = AdapterApi()


@contextlib.contextmanager
def _failing(what: str) -> Iterator[None]:
    """API and store trouble while doing `what`: transient → retry later, the rest propagates."""
    try:
        yield
    except Transient as error:
        raise kopf.TemporaryError(f"{what}: {error}", delay=min(CONFIG.poll_seconds, 30)) from None


def _emit(body: Any, events: list[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


# -- FineTuneJob --------------------------------------------------------------------------------


def _failed(body: Any, patch: kopf.Patch, status: dict[str, Any], reason: str, message: str,
            conditions: list[dict[str, str]], **fields: Any) -> None:
    """How anything the operator owns ends Failed, a job or an Adapter: phase Failed with `fields`, the
    conditions that say why (after `condition`, which redacts), and a Warning Event with the reason."""
    message = redact(message)
    patch.status.update({"phase": "Failed", **fields})
    patch.status["conditions"] = merge_conditions(status.get("conditions") or [], conditions, _now())
    kopf.warn(body, reason=reason, message=message)


def _fail(body: Any, patch: kopf.Patch, status: dict[str, Any], code: str, message: str,
          also: tuple[dict[str, str], ...] = ()) -> None:
    """End the job: phase Failed, an error with a code, a Failed condition, a Warning Event."""
    message = redact(message)
    _failed(body, patch, status, code, message, [*also, condition("Failed", True, code, message)],
            error={"code": code, "message": message}, completionTime=_now())


def _adapter_failed(body: Any, patch: kopf.Patch, status: dict[str, Any], reason: str, message: str,
                    **fields: Any) -> None:
    """The Adapter cannot be served: phase Failed with a message, Ready False with the reason, an Event."""
    message = redact(message)
    _failed(body, patch, status, reason, message, [condition("Ready", False, reason, message)], message=message,
            **fields)


def _owned_by(obj: dict[str, Any], body: Any) -> bool | None:
    """True: owned by this job; False: by an earlier job of the same name; None: by nobody/another kind."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    if any(r.get("uid") == body["metadata"]["uid"] for r in refs):
        return True
    if any(r.get("kind") == "FineTuneJob" and r.get("name") == body["metadata"]["name"] for r in refs):
        return False
    return None


def _submit(body: Any, status: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo) -> None:
    try:
        job = effective_job(dict(body), memo.config)
    except InvalidSpecError as error:
        message = "; ".join(error.problems)
        patch.status["observedGeneration"] = body["metadata"].get("generation")
        _fail(body, patch, status, "InvalidSpec", message, (condition("SpecValid", False, "InvalidSpec", message),))
        return
    owner = owner_reference(dict(body))
    kube: Kube = memo.kube
    name = workflow_name(job.metadata.name)
    generation = body["metadata"].get("generation")
    with _failing("checking the credentials Secret"):
        problem = _missing_secret(job, memo, kube)
    if problem is not None:
        patch.status.update({"phase": "Pending", "observedGeneration": generation, "conditions": merge_conditions(
            status.get("conditions") or [],
            [condition("SpecValid", True, "Valid"), _credentials_condition(body, status, problem)], _now())})
        # Not Failed: creating the Secret is enough to go on, and kopf retries this handler.
        raise kopf.TemporaryError(problem, delay=min(CONFIG.poll_seconds * 3, 30))
    try:
        with _failing("submitting the job"):
            for child in (build_job_configmap(job, owner), build_workflow(job, memo.config, owner)):
                existing, created = kube.create(child)
                generation = submitted_generation(existing) or generation
                owned = created or _owned_by(existing, body)
                if owned is False:
                    raise kopf.TemporaryError(f"{child['kind']} {name} still belongs to an earlier job named "
                                              f"{job.metadata.name}; waiting for it to be garbage-collected", delay=5)
                if owned is None:
                    _fail(body, patch, status, "NameConflict", f"a {child['kind']} named {name} exists and does not "
                                                               "belong to this job; delete it or rename the job")
                    return
    except Rejected as error:
        _fail(body, patch, status, "SubmissionRejected", str(error))
        return
    now = _now()
    patch.status.update({
        "phase": "Queued",
        "workflowRef": {"name": name},
        # The generation that runs: an earlier one if the Workflow existed already (a retried submit).
        "observedGeneration": generation,
        "startTime": status.get("startTime") or now,
        "error": None,
        "completionTime": None,
        "conditions": merge_conditions([], [
            condition("SpecValid", True, "Valid"),
            *([condition("CredentialsReady", True, "SecretFound")] if job.spec.store.credentials_secret else []),
            condition("Submitted", True, "WorkflowCreated", f"Workflow {name} from WorkflowTemplate "
                                                            f"{memo.config.workflow_template}"),
        ], now),
    })
    kopf.info(body, reason="Submitted", message=f"Workflow {name} created from {memo.config.workflow_template}")


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
def submit(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Validate a new job and start its Workflow; on resume, only jobs not yet submitted."""
    if status.get("phase") in TERMINAL or status.get("workflowRef"):
        return
    _submit(body, dict(status), patch, memo)


@kopf.on.update(*FINETUNEJOBS, field="spec")
def spec_changed(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                 diff: kopf.Diff, **_: Any) -> None:
    if not status.get("workflowRef"):
        _submit(body, dict(status), patch, memo)  # never ran: the new spec gets its chance
        return
    fields = sorted({".".join(("spec", *map(str, d[1]))) for d in diff}) or ["spec"]
    message = (f"spec is immutable once the job is submitted; not applied: {', '.join(fields)}. The job goes on "
               f"with the spec it was submitted with (ConfigMap {workflow_name(body['metadata']['name'])}); "
               "create a new FineTuneJob to train with the new one")
    patch.status["conditions"] = merge_conditions(status.get("conditions") or [], [
        condition("SpecChangeRefused", True, "SpecImmutable", message)], _now())
    kopf.warn(body, reason="SpecChangeRefused", message=message)
    raise kopf.PermanentError(message)


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


def _frozen_job(body: kopf.Body, memo: kopf.Memo, kube: Kube) -> FineTuneJob:
    """The job as submitted (its ConfigMap), not as it may have been edited since."""
    job = memo.get("job")
    if isinstance(job, FineTuneJob) and job.metadata.name == body["metadata"]["name"]:
        return job
    configmap = kube.get("v1", "ConfigMap", body["metadata"]["namespace"], workflow_name(body["metadata"]["name"]))
    if configmap is None:
        job = effective_job(dict(body), memo.config)
    else:
        resource = parse_resource(safe_load(configmap["data"][JOB_CONFIG_KEY]))
        job = resource if isinstance(resource, FineTuneJob) else effective_job(dict(body), memo.config)
    memo.job = job
    return job


def _credentials(job: FineTuneJob, memo: kopf.Memo, kube: Kube) -> dict[str, str] | None:
    secret = job.spec.store.credentials_secret
    if not secret:
        return None
    cached = memo.get("credentials")
    if cached and cached[0] == secret and time.monotonic() - cached[1] < SECRET_TTL_SECONDS:
        return cached[2]
    data = kube.secret_data(job.metadata.namespace, secret)
    memo.credentials = (secret, time.monotonic(), data)
    return data


def _missing_secret(job: FineTuneJob, memo: kopf.Memo, kube: Kube) -> str | None:
    """Why the job's credentials Secret cannot be used (a message for a person), or None when it can.

    Without it no step's pod can start (its env comes from the Secret): the job would sit Queued
    with nothing said, so the operator looks first and says so."""
    secret = job.spec.store.credentials_secret
    if not secret:
        return None
    try:
        _credentials(job, memo, kube)
    except Rejected as error:
        memo.credentials = None
        if error.status == 404:
            return (f"Secret {secret} (spec.store.credentialsSecret) does not exist in namespace "
                    f"{job.metadata.namespace}: create it with the store's S3_ENDPOINT, AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY; the job starts once it exists")
        return f"Secret {secret} (spec.store.credentialsSecret) cannot be read: HTTP {error.status}"
    return None


def _credentials_condition(body: Any, status: dict[str, Any], problem: str | None) -> dict[str, str]:
    """The CredentialsReady condition, with a Warning Event when it turns False."""
    ready = condition("CredentialsReady", problem is None, "SecretFound" if problem is None else "SecretNotFound",
                      problem or "")
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == "CredentialsReady"), {})
    if problem is not None and (previous.get("status") != "False" or previous.get("message") != problem):
        kopf.warn(body, reason="SecretNotFound", message=problem)
    return ready


def _observe(job: FineTuneJob, memo: kopf.Memo, kube: Kube, logger: Any) -> Observation | None:
    namespace = job.metadata.namespace
    workflow = kube.get("argoproj.io/v1alpha1", "Workflow", namespace, workflow_name(job.metadata.name))
    if workflow is None:
        return None
    nodes = step_nodes(workflow)
    done = {step for step, node in nodes.items() if node.get("phase") == "Succeeded"}
    training_job = None
    if "train" in nodes:
        training_job = kube.get(*TRAINING_KINDS[launcher_of(job)], namespace, training_job_name(job.metadata.name))
    try:
        artifacts = read_job_artifacts(job, _credentials(job, memo, kube), need_report="evaluate" in done,
                                       need_published="publish" in done)
    except (StoreError, RecordError, Rejected) as error:
        # The status keeps its last progress; the Workflow's phase is still mirrored.
        logger.warning(f"cannot read the job's artifacts from {job.spec.store.uri}: {error}")
        return Observation(workflow=workflow, training_job=training_job)
    return Observation(workflow, training_job, artifacts.progress, artifacts.report, artifacts.published)


def _serve(body: kopf.Body, job: FineTuneJob, obs: Observation, kube: Kube) -> list[dict[str, str]]:
    """On success: the promotion rule, and the Adapter when the rule says serve. Returns conditions."""
    decision = promotion(job, obs.report)
    conditions = [condition("Promoted", decision.promoted, decision.reason, decision.message)]
    if not decision.promoted:
        kopf.info(body, reason="NotPromoted", message=decision.message)
        return conditions
    adapter = build_adapter(job, obs.published)
    existing, created = kube.create(adapter)
    lineage = existing.get("spec", {}).get("lineage", {}).get("job")
    name = adapter["metadata"]["name"]
    if created:
        kopf.info(body, reason="AdapterCreated", message=f"Adapter {name} created: {decision.message}")
    elif existing.get("spec", {}).get("uri") != adapter["spec"]["uri"]:
        # A newer job publishing under the same adapter name supersedes the served version.
        kube.patch(API_VERSION, "Adapter", job.metadata.namespace, name,
                   {"metadata": {"labels": adapter["metadata"]["labels"]}, "spec": adapter["spec"]})
        kopf.info(body, reason="AdapterUpdated",
                  message=f"Adapter {name} now serves {adapter['spec']['uri']} (was from {lineage})")
    return conditions


@kopf.timer(*FINETUNEJOBS, interval=CONFIG.poll_seconds, initial_delay=CONFIG.poll_seconds, when=_running)
def follow(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Mirror the Workflow, the training job and the trainer's files into the job's status."""
    kube: Kube = memo.kube
    current = dict(status)
    if not current.get("workflowRef"):
        # Submitted but not recorded (the status write failed): submitting again finds the same
        # Workflow by its name and records it.
        _submit(body, current, patch, memo)
        return
    with _failing("following the job"):
        job = _frozen_job(body, memo, kube)
        obs = _observe(job, memo, kube, logger)
        if obs is None:
            _fail(body, patch, current, "WorkflowDeleted",
                  f"the Workflow {current['workflowRef']['name']} no longer exists")
            return
        update = derive_status(job, current, obs, _now())
        if job.spec.store.credentials_secret:  # deleted after submission: the steps' pods cannot start
            update.status["conditions"] = merge_conditions(update.status["conditions"], [
                _credentials_condition(body, current, _missing_secret(job, memo, kube))], _now())
        if update.status["phase"] == "Succeeded":
            try:
                promoted = _serve(body, job, obs, kube)
            except Rejected as error:
                _fail(body, patch, current, "AdapterRejected", str(error))
                return
            update.status["conditions"] = merge_conditions(update.status["conditions"], promoted, _now())
    patch.status.update(changed_fields(current, update.status))
    _emit(body, update.events)


# -- Adapter ------------------------------------------------------------------------------------


def _adapter_status(body: kopf.Body, patch: kopf.Patch, status: dict[str, Any], desired: dict[str, Any]) -> None:
    previous = status.get("phase")
    reason = "LoadFailed" if desired["phase"] == "Failed" else desired["phase"]
    desired["conditions"] = merge_conditions(status.get("conditions") or [], [
        condition("Ready", desired["phase"] == "Ready", reason, desired.get("message", ""))], _now())
    patch.status.update(changed_fields(status, desired))
    if previous != desired["phase"]:
        if desired["phase"] == "Ready":
            kopf.info(body, reason="Loaded", message=desired["message"])
        elif desired["phase"] == "Failed":
            _adapter_failed(body, patch, status, "LoadFailed", desired["message"])


def _sync_adapter(body: kopf.Body, adapter: Adapter, status: dict[str, Any], patch: kopf.Patch,
                  memo: kopf.Memo) -> None:
    kube: Kube = memo.kube
    namespace, isvc_name = adapter.metadata.namespace, adapter.inference_service_name
    isvc = kube.get("serving.kserve.io/v1beta1", "InferenceService", namespace, isvc_name)
    if isvc is None:
        _adapter_status(body, patch, status, {
            "phase": "Pending", "inferenceService": isvc_name, "replicas": [],
            "message": f"InferenceService {isvc_name} does not exist"
                       + ("" if adapter.spec.serving.create_inference_service else " (createInferenceService "
                                                                                   "is false: create it)"),
        })
        return
    pods = kube.ready_pods(namespace, f"{ISVC_LABEL}={isvc_name}")
    replicas = replicas_from_pods(pods, memo.config.replica_port)
    backoffs: dict[str, Backoff] = memo.setdefault("backoffs", {})
    for gone in set(backoffs) - {r.uid for r in replicas}:
        del backoffs[gone]
    entries = [sync_replica(memo.adapter_api, r, adapter, backoffs.setdefault(r.uid, Backoff())) for r in replicas]
    phase, message = adapter_phase(entries)
    url = (isvc.get("status") or {}).get("url")
    _adapter_status(body, patch, status, {
        "phase": phase, "message": message, "replicas": entries, "inferenceService": isvc_name,
        "url": f"{url.rstrip('/')}/openai/v1" if url else None,
        "observedGeneration": body["metadata"].get("generation"),
    })


@kopf.on.resume(*ADAPTERS)
@kopf.on.create(*ADAPTERS)
@kopf.on.update(*ADAPTERS, field="spec")
def adapter_changed(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Validate, make sure the InferenceService exists when asked to, and load where possible."""
    try:
        adapter = parse_resource(dict(body))
    except InvalidSpecError as error:
        _adapter_failed(body, patch, dict(status), "InvalidSpec", "; ".join(error.problems),
                        observedGeneration=body["metadata"].get("generation"))
        return
    assert isinstance(adapter, Adapter)
    with _failing("serving the adapter"):
        if adapter.spec.serving.create_inference_service:
            try:
                _, created = memo.kube.create(build_inference_service(adapter, memo.config))
            except Rejected as error:
                _adapter_failed(body, patch, dict(status), "InferenceServiceRejected", str(error))
                return
            if created:
                kopf.info(body, reason="InferenceServiceCreated", message=f"InferenceService "
                                                                          f"{adapter.inference_service_name}")
        _sync_adapter(body, adapter, dict(status), patch, memo)


def _valid_adapter(body: kopf.Body, **_: Any) -> bool:
    try:
        return isinstance(parse_resource(dict(body)), Adapter)
    except InvalidSpecError:
        return False


@kopf.timer(*ADAPTERS, interval=CONFIG.poll_seconds, when=_valid_adapter)
def adapter_sync(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Every replica holds the adapter: load where missing (new or restarted replicas), retry failures."""
    adapter = parse_resource(dict(body))
    assert isinstance(adapter, Adapter)
    with _failing("syncing the adapter"):
        _sync_adapter(body, adapter, dict(status), patch, memo)


@kopf.on.delete(*ADAPTERS, retries=5, backoff=2)
def adapter_deleted(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Unload from every ready replica before the Adapter goes (kopf holds a finalizer until then)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    isvc_name = (body.get("status") or {}).get("inferenceService")
    if not isvc_name:
        return
    with _failing("unloading the adapter"):
        pods = memo.kube.ready_pods(namespace, f"{ISVC_LABEL}={isvc_name}")
    failures = []
    for replica in replicas_from_pods(pods, memo.config.replica_port):
        try:
            memo.adapter_api.unload(replica, name)
        except AdapterApiError as error:
            failures.append(f"{replica.name}: {error}")
    if failures:
        raise kopf.TemporaryError(f"unloading {name} failed on {'; '.join(failures)}", delay=2)
    logger.info(f"unloaded {name} from InferenceService {isvc_name}")

