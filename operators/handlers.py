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
from tessera.api.paths import job_prefix
from tessera.api.records import RecordError
from tessera.api.tenancy import PolicyError
from tessera.errors import InvalidSpecError, StoreError
from tessera.redact import install_log_redaction, redact
from tessera.safe_yaml import safe_load
from tessera_operator.artifacts import delete_job_artifacts, read_job_artifacts
from tessera_operator.builders import (
    ISVC_LABEL,
    JOB_CONFIG_KEY,
    LABEL_MANAGED_BY,
    MANAGER,
    TRAINING_KINDS,
    build_adapter,
    build_inference_service,
    build_job_configmap,
    build_workflow,
    check_tenancy,
    effective_job,
    frozen_digest,
    launcher_of,
    owner_reference,
    submitted_generation,
    training_job_name,
    workflow_name,
)
from tessera_operator.config import OperatorConfig
from tessera_operator.fairness import NamespaceSlots
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
    settings.execution.max_workers = CONFIG.max_workers
    install_log_redaction()  # kopf's handlers are on the root logger by now
    install_log_redaction(logging.getLogger("kopf.objects"))  # kopf posts these records as Events
    memo.config = CONFIG
    memo.kube = Kube(load_config())
    memo.adapter_api = AdapterApi(timeout=CONFIG.adapter_load_timeout)
    memo.slots = NamespaceSlots(CONFIG.max_namespace_operations)


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
            conditions: list[dict[str, str]], /, **fields: Any) -> None:
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
    """The Adapter cannot be served: phase Failed with a message and its reason, Ready False with the reason,
    an Event."""
    message = redact(message)
    _failed(body, patch, status, reason, message, [condition("Ready", False, reason, message)], message=message,
            reason=reason, **fields)


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
        code = error.reason if isinstance(error, PolicyError) else "InvalidSpec"
        patch.status["observedGeneration"] = body["metadata"].get("generation")
        _fail(body, patch, status, code, message, (condition("SpecValid", False, code, message),))
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
    configmap = build_job_configmap(job, owner)
    try:
        with _failing("submitting the job"):
            for child in (configmap, build_workflow(job, memo.config, owner)):
                existing, created = kube.create(child)
                if child is configmap and not created and frozen_digest(existing) != frozen_digest(configmap):
                    # Made by someone else under the job's name (anyone who can write ConfigMaps in the
                    # namespace can set an ownerReference): never run a spec the operator did not validate.
                    _fail(body, patch, status, "FrozenSpecMismatch", f"ConfigMap {name} exists and is not the "
                          "immutable spec the operator would write for this job; delete it (or rename the job)")
                    return
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
        "specDigest": frozen_digest(configmap),
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
def submit(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, retry: int = 0,
           **_: Any) -> None:
    """Validate a new job and start its Workflow; on resume, only jobs not yet submitted."""
    if status.get("phase") in TERMINAL or status.get("workflowRef"):
        return
    with memo.slots.slot(body["metadata"]["namespace"], retry):
        _submit(body, dict(status), patch, memo)


@kopf.on.update(*FINETUNEJOBS, field="spec")
def spec_changed(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                 diff: kopf.Diff, retry: int = 0, **_: Any) -> None:
    if not status.get("workflowRef"):
        with memo.slots.slot(body["metadata"]["namespace"], retry):
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


class FrozenSpecTampered(Exception):
    """The job's ConfigMap is not the one the operator wrote at submission."""


def _frozen_job(body: kopf.Body, status: dict[str, Any], memo: kopf.Memo, kube: Kube) -> FineTuneJob:
    """The job as submitted (its ConfigMap), not as it may have been edited since.

    Who the job is (name, namespace) comes from the FineTuneJob, never from the ConfigMap: anyone who
    may write ConfigMaps in the namespace could write one. Its content is used only while its digest
    is the one recorded in the job's status at submission; else FrozenSpecTampered. Read on every
    look (one GET), so a ConfigMap deleted and made again is seen at once."""
    meta = body["metadata"]
    configmap = kube.get("v1", "ConfigMap", meta["namespace"], workflow_name(meta["name"]))
    recorded = status.get("specDigest")
    if configmap is None and recorded is not None:
        raise FrozenSpecTampered(f"ConfigMap {workflow_name(meta['name'])} was deleted after submission; the job's "
                                 "steps cannot read their spec")
    if configmap is None or (recorded is None and frozen_digest(configmap) is None):
        job = effective_job(dict(body), memo.config)  # never written, or written before digests were recorded
    else:
        if recorded is not None and frozen_digest(configmap) != recorded:
            raise FrozenSpecTampered(f"ConfigMap {configmap['metadata']['name']} was changed after submission (its "
                                     "digest is not the one in status.specDigest); the operator no longer reads it")
        document = safe_load(configmap["data"][JOB_CONFIG_KEY])
        written = document.get("metadata") if isinstance(document, dict) else None
        if not isinstance(written, dict) or (written.get("name"), written.get("namespace")) != (
                meta["name"], meta["namespace"]):
            raise FrozenSpecTampered(f"ConfigMap {configmap['metadata']['name']} names another job; the operator "
                                     "no longer reads it")
        document["metadata"] = {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")}
        resource = parse_resource(document)
        if not isinstance(resource, FineTuneJob):
            raise FrozenSpecTampered(f"ConfigMap {configmap['metadata']['name']} holds a {resource.kind}")
        check_tenancy(resource, memo.config)
        job = resource
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
        if not _published_here(existing, job):
            message = (f"Adapter {name} exists and was not published by a job of namespace {job.metadata.namespace} "
                       f"(lineage: {lineage or 'none'}); it is left as it is: publish under another output.adapterName")
            kopf.warn(body, reason="AdapterNotOwned", message=message)
            return [condition("Promoted", False, "AdapterNotOwned", message)]
        # A newer job of the namespace publishing under the same adapter name supersedes the served version.
        kube.patch(API_VERSION, "Adapter", job.metadata.namespace, name,
                   {"metadata": {"labels": adapter["metadata"]["labels"]}, "spec": adapter["spec"]})
        kopf.info(body, reason="AdapterUpdated",
                  message=f"Adapter {name} now serves {adapter['spec']['uri']} (was from {lineage})")
    return conditions


def _published_here(adapter: dict[str, Any], job: FineTuneJob) -> bool:
    """Whether an existing Adapter is one the operator created for a job of `job`'s namespace."""
    lineage = adapter.get("spec", {}).get("lineage", {}).get("job") or ""
    labels = adapter.get("metadata", {}).get("labels") or {}
    return lineage.partition("/")[0] == job.metadata.namespace and labels.get(LABEL_MANAGED_BY) == MANAGER


@kopf.timer(*FINETUNEJOBS, interval=CONFIG.poll_seconds, initial_delay=CONFIG.poll_seconds, when=_running)
def follow(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int = 0,
           **_: Any) -> None:
    """Mirror the Workflow, the training job and the trainer's files into the job's status."""
    with memo.slots.slot(body["metadata"]["namespace"], retry):
        _follow(body, dict(status), patch, memo, logger)


def _follow(body: kopf.Body, current: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo, logger: Any) -> None:
    kube: Kube = memo.kube
    if not current.get("workflowRef"):
        # Submitted but not recorded (the status write failed): submitting again finds the same
        # Workflow by its name and records it.
        _submit(body, current, patch, memo)
        return
    with _failing("following the job"):
        try:
            job = _frozen_job(body, current, memo, kube)
        except (FrozenSpecTampered, InvalidSpecError) as error:
            code = "FrozenSpecTampered" if isinstance(error, FrozenSpecTampered) else getattr(
                error, "reason", "InvalidSpec")
            _fail(body, patch, current, code, "; ".join(getattr(error, "problems", [str(error)])))
            return
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


@kopf.on.delete(*FINETUNEJOBS, retries=5, backoff=5)
def job_deleted(body: kopf.Body, status: kopf.Status, memo: kopf.Memo, logger: Any, retry: int = 0,
                **_: Any) -> None:
    """Remove the job's store prefix before it goes (a finalizer); its published adapters stay."""
    if not status.get("workflowRef"):
        return  # never submitted: it wrote nothing
    try:
        job = _frozen_job(body, dict(status), memo, memo.kube)
    except (FrozenSpecTampered, InvalidSpecError, Transient):
        try:
            job = effective_job(dict(body), memo.config)  # who it is comes from the FineTuneJob either way
        except InvalidSpecError:
            return
    with memo.slots.slot(job.metadata.namespace, retry), _failing("removing the job's artifacts"):
        try:
            delete_job_artifacts(job, _credentials(job, memo, memo.kube))
        except (StoreError, Rejected) as error:
            raise kopf.TemporaryError(f"removing {job_prefix(job)} from the store: {error}", delay=5) from None
    logger.info(f"removed {job_prefix(job)} from the store")


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
def adapter_changed(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, retry: int = 0,
                    **_: Any) -> None:
    """Validate, make sure the InferenceService exists when asked to, and load where possible."""
    try:
        adapter = _checked_adapter(body, memo.config)
    except InvalidSpecError as error:
        _adapter_failed(body, patch, dict(status), getattr(error, "reason", "InvalidSpec"), "; ".join(error.problems),
                        observedGeneration=body["metadata"].get("generation"))
        return
    with memo.slots.slot(adapter.metadata.namespace, retry), _failing("serving the adapter"):
        if adapter.spec.serving.create_inference_service:
            try:
                refusal = _ensure_inference_service(body, adapter, memo)
            except Rejected as error:
                refusal = ("InferenceServiceRejected", str(error))
            if refusal is not None:
                _adapter_failed(body, patch, dict(status), *refusal,
                                observedGeneration=body["metadata"].get("generation"))
                return
        _sync_adapter(body, adapter, dict(status), patch, memo)


def _checked_adapter(body: kopf.Body, config: OperatorConfig) -> Adapter:
    adapter = parse_resource(dict(body))
    if not isinstance(adapter, Adapter):
        raise InvalidSpecError([f"kind: expected Adapter, found {adapter.kind}"])
    check_tenancy(adapter, config)
    return adapter


def _ensure_inference_service(body: kopf.Body, adapter: Adapter, memo: kopf.Memo) -> tuple[str, str] | None:
    """Create the base model's InferenceService unless it exists; (reason, message) when refused."""
    kube: Kube = memo.kube
    name, namespace = adapter.inference_service_name, adapter.metadata.namespace
    if kube.get("serving.kserve.io/v1beta1", "InferenceService", namespace, name) is not None:
        return None
    managed = kube.count("serving.kserve.io/v1beta1", "InferenceService", namespace, f"{LABEL_MANAGED_BY}={MANAGER}")
    if managed >= memo.config.max_inference_services:
        return ("InferenceServiceQuota", f"namespace {namespace} has {managed} InferenceService(s) made by Tessera, "
                f"its limit (the chart's tenancy.maxInferenceServicesPerNamespace); InferenceService {name} "
                "for this adapter's base model is not created: serve it on an existing base model")
    _, created = kube.create(build_inference_service(adapter, memo.config))
    if created:
        kopf.info(body, reason="InferenceServiceCreated", message=f"InferenceService {name}")
    return None


def _valid_adapter(body: kopf.Body, **_: Any) -> bool:
    try:
        _checked_adapter(body, CONFIG)
    except InvalidSpecError:
        return False
    return True


@kopf.timer(*ADAPTERS, interval=CONFIG.poll_seconds, when=_valid_adapter)
def adapter_sync(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, retry: int = 0,
                 **_: Any) -> None:
    """Every replica holds the adapter: load where missing (new or restarted replicas), retry failures."""
    adapter = _checked_adapter(body, memo.config)
    with memo.slots.slot(adapter.metadata.namespace, retry), _failing("syncing the adapter"):
        _sync_adapter(body, adapter, dict(status), patch, memo)


@kopf.on.delete(*ADAPTERS, retries=5, backoff=2)
def adapter_deleted(body: kopf.Body, memo: kopf.Memo, logger: Any, retry: int = 0, **_: Any) -> None:
    """Unload from every ready replica before the Adapter goes (kopf holds a finalizer until then)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    isvc_name = (body.get("status") or {}).get("inferenceService")
    if not isvc_name:
        return
    with memo.slots.slot(namespace, retry):
        _unload_everywhere(name, namespace, isvc_name, memo, logger)


def _unload_everywhere(name: str, namespace: str, isvc_name: str, memo: kopf.Memo, logger: Any) -> None:
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



# Experiments (one FineTuneJob per matrix cell) live in their own module; importing it registers them.
from tessera_operator import experiments  # noqa: E402,F401
