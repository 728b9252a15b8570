"""Pure builders of the objects the operator creates: same job in, same objects out.

The operator's handlers and `tessera render` share them, so what a person reviews with
`tessera render -f job.yaml` is what the operator submits.

Ownership, and why:
- The job's ConfigMap (its frozen manifest) and its Workflow are owned by the FineTuneJob:
  deleting the job garbage-collects the Workflow, which owns the training job its train step
  creates (a PyTorchJob, or a TrainJob and its TrainingRuntime; `setOwnerReference`), so
  deleting a job stops all its work.
- The Adapter a succeeded job creates is NOT owned by the job. A promoted adapter serves traffic;
  cleaning up finished jobs must not take a model out of production. It carries the label
  `tessera.dev/job` and `spec.lineage.job` instead, so `kubectl get lora -l tessera.dev/job=x`
  finds it.
- The InferenceService is shared by every adapter of one base model and owned by none of them.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import yaml
from tessera.adapter_format.runtime import job_problems
from tessera.api import GROUP, VERSION, Adapter, FineTuneJob, parse_resource, tenancy
from tessera.api.finetunejob import LAUNCHERS
from tessera.api.naming import dns_label, inference_service_for
from tessera.api.records import PublishedRecord
from tessera.api.tenancy import PolicyError
from tessera.errors import InvalidSpecError
from tessera_operator.config import OperatorConfig
from tessera_pipelines.finetune import render_training_objects
from tessera_pipelines.interface import DEFAULT_TEACHER_SECRET, JOB_FILE, json_parameter

LABEL_JOB = "tessera.dev/job"
LABEL_ADAPTER_VERSION = "tessera.dev/adapter-version"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_GENERATION = "tessera.dev/job-generation"
MANAGER = "tessera-operator"
ISVC_LABEL = "serving.kserve.io/inferenceservice"
JOB_CONFIG_KEY = JOB_FILE.rsplit("/", 1)[-1]


def workflow_name(job_name: str) -> str:
    """The job's Workflow (and ConfigMap) name: deterministic, so a restart never makes a second one."""
    return dns_label(f"ftj-{job_name}")


# The training job's kind for each launcher: what the train step creates and the operator reads.
TRAINING_KINDS = {"pytorchjob": ("kubeflow.org/v1", "PyTorchJob"),
                  "trainjob": ("trainer.kubeflow.org/v1alpha1", "TrainJob")}


def training_job_name(job_name: str) -> str:
    # Pods are named <name>-master-0 / <name>-worker-N (PyTorchJob) or <name>-node-0-N-xxxxx
    # (TrainJob, through JobSet) and must stay within 63 characters.
    return dns_label(f"ftj-{job_name}-train", max_length=46)


def launcher_of(job: FineTuneJob) -> str:
    """The job's launcher; `effective_job` has filled in the installation's default."""
    return job.spec.distribution.launcher or LAUNCHERS[0]


def effective_job(body: dict[str, Any], config: OperatorConfig) -> FineTuneJob:
    """The job as it will run: the object validated, with the installation's store where it names none.

    Raises InvalidSpecError listing every `spec.x: rule` problem.
    """
    document = copy.deepcopy(dict(body))
    document.pop("status", None)
    spec = document.get("spec")
    if isinstance(spec, dict) and config.store_uri:
        store = spec.setdefault("store", {})
        if isinstance(store, dict) and "uri" not in store:
            store["uri"] = config.store_uri
            store.setdefault("credentialsSecret", config.store_secret)
    if isinstance(spec, dict):
        distribution = spec.setdefault("distribution", {})
        if isinstance(distribution, dict):
            distribution.setdefault("launcher", config.launcher)
    resource = parse_resource(document)
    if not isinstance(resource, FineTuneJob):
        raise InvalidSpecError([f"kind: expected FineTuneJob, found {resource.kind}"])
    if launcher_of(resource) not in config.launchers:
        raise InvalidSpecError([f"spec.distribution.launcher: {launcher_of(resource)} is not enabled in this "
                                f"installation (enabled: {', '.join(config.launchers)}; the chart's "
                                "training.launcher and training.otherLaunchers)"])
    problems = job_problems(resource.spec, config.runtime_profile()) if resource.spec.serving.enabled else []
    if problems:
        raise InvalidSpecError(problems)
    check_tenancy(resource, config)
    return resource


def check_tenancy(resource: FineTuneJob | Adapter, config: OperatorConfig) -> None:
    """The installation's tenancy policy (see tessera.api.tenancy): raises PolicyError with the reason
    the status and the Event give."""
    rules = config.tenancy_rules()
    is_adapter = isinstance(resource, Adapter)
    outside = tenancy.adapter_problems(resource, rules) if is_adapter else tenancy.job_problems(resource, rules)
    if outside:
        raise PolicyError(outside, "OutsideTenantPrefixes")
    if not is_adapter:
        scheduling = resource.spec.scheduling
        refused = config.scheduling_allowlist().problems(scheduling.node_selector, scheduling.tolerations,
                                                         scheduling.priority_class_name)
        if refused:
            raise PolicyError(refused, "SchedulingNotAllowed")
    # Only the per-base InferenceService the operator manages: never one a tenant names (another
    # team's, or a new GPU predictor under any name).
    named, base = resource.spec.serving.inference_service, resource.spec.base_model.uri
    if rules.enforced and named and named != inference_service_for(base):
        raise PolicyError([f"spec.serving.inferenceService: {named} is not the InferenceService this installation "
                           f"manages for base model {base} ({inference_service_for(base)}); leave it unset"],
                          "InferenceServiceNotAllowed")


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """A controller reference to `body`, so Kubernetes garbage-collects the child with it."""
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGER, **labels}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def _job_metadata(job: FineTuneJob, owner: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata of a job's ConfigMap and Workflow: which generation of the spec they run."""
    meta = _metadata(workflow_name(job.metadata.name), job.metadata.namespace, {LABEL_JOB: job.metadata.name}, owner)
    if job.metadata.generation is not None:
        meta["annotations"] = {ANNOTATION_GENERATION: str(job.metadata.generation)}
    return meta


def submitted_generation(obj: dict[str, Any]) -> int | None:
    """The job generation a Workflow or ConfigMap was built from (None if it does not say)."""
    value = (obj.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_GENERATION)
    return int(value) if value and value.isdigit() else None


def frozen_manifest(job: FineTuneJob) -> dict[str, Any]:
    """The job as its steps read it: every default filled in, no cluster bookkeeping."""
    manifest = job.to_manifest()
    manifest["metadata"] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    return manifest


def build_job_configmap(job: FineTuneJob, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ConfigMap every step and training pod mounts at /config: the spec frozen at submission.

    Immutable: nobody can edit it in place; one deleted and made again under its name is told apart
    by its digest, which the job's status records at submission (`frozen_digest`)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _job_metadata(job, owner),
        "immutable": True,
        "data": {JOB_CONFIG_KEY: yaml.safe_dump(frozen_manifest(job), sort_keys=False)},
    }


def frozen_digest(configmap: dict[str, Any]) -> str | None:
    """sha256 of a job ConfigMap's frozen manifest; None when it is not an immutable one with that key."""
    text = (configmap.get("data") or {}).get(JOB_CONFIG_KEY)
    if not configmap.get("immutable") or not isinstance(text, str):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def eval_pod_spec_patch(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Placement of the evaluate step: on the GPU pool with one GPU when the job trains on GPUs."""
    if job.spec.distribution.gpus_per_worker == 0:
        return {}
    scheduling = job.spec.scheduling
    patch: dict[str, Any] = {
        "containers": [{"name": "main", "resources": {"limits": {config.gpu_resource: "1"}}}],
    }
    if scheduling.node_selector:
        patch["nodeSelector"] = scheduling.node_selector
    if scheduling.tolerations:
        patch["tolerations"] = scheduling.tolerations
    if scheduling.priority_class_name:
        patch["priorityClassName"] = scheduling.priority_class_name
    return patch


def workflow_arguments(job: FineTuneJob, config: OperatorConfig) -> dict[str, str]:
    """The `tessera-finetune` template's parameters for this job (see tessera_pipelines.interface.PARAMETERS)."""
    distribution, scheduling = job.spec.distribution, job.spec.scheduling
    return {
        "job-name": job.metadata.name,
        "image": config.trainer_image,
        "store-secret": job.spec.store.credentials_secret or config.store_secret,
        "launcher": launcher_of(job),
        "training-job-name": training_job_name(job.metadata.name),
        "num-nodes": str(distribution.workers),
        "worker-replicas": str(distribution.workers - 1),
        "nproc-per-node": str(max(distribution.gpus_per_worker, 1)),
        "gpus-per-worker": str(distribution.gpus_per_worker),
        "gpu-resource": config.gpu_resource,
        # Losing one node restarts every node's torchrun: each restart costs one per worker.
        "restart-limit": str(distribution.max_restarts * distribution.workers),
        "node-selector": json_parameter(scheduling.node_selector),
        "tolerations": json_parameter(scheduling.tolerations),
        "priority-class-name": scheduling.priority_class_name or "",
        "eval-pod-spec-patch": json_parameter(eval_pod_spec_patch(job, config)),
        **teacher_arguments(job),
    }


def teacher_arguments(job: FineTuneJob) -> dict[str, str]:
    """Whether the label step runs, and the Secret its key comes from (spec.dataset.teacher)."""
    teacher = job.spec.dataset.teacher
    return {"teacher": "true" if teacher else "false",
            "teacher-secret": (teacher.credentials_secret if teacher else None) or DEFAULT_TEACHER_SECRET}


def build_workflow(job: FineTuneJob, config: OperatorConfig, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Workflow that runs the job: a reference to the WorkflowTemplate plus the job's parameters."""
    arguments = workflow_arguments(job, config)
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": _job_metadata(job, owner),
        "spec": {
            "workflowTemplateRef": {"name": config.workflow_template},
            "serviceAccountName": config.workflow_service_account,
            "arguments": {"parameters": [{"name": k, "value": v} for k, v in arguments.items()]},
        },
    }


def workflow_parameters(workflow: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p.get("value", "") for p in workflow["spec"].get("arguments", {}).get("parameters", [])}


def preview_training_objects(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """What `workflow`'s train step will create (for review; Argo creates them): a PyTorchJob, or a
    TrainingRuntime and the TrainJob that runs on it."""
    objects = render_training_objects(workflow_parameters(workflow), workflow["metadata"]["name"])
    for obj in objects:
        obj["metadata"]["namespace"] = workflow["metadata"]["namespace"]
    return objects


def build_inference_service(adapter: Adapter, config: OperatorConfig) -> dict[str, Any]:
    """The InferenceService that serves the adapter's base model with the installation's runtime.

    RawDeployment: predictors are plain Deployments whose pods keep their hot-loaded adapters,
    with no scale-to-zero that would drop them. The serving container gets no store credential:
    KServe's storage initializer brings the base model, the adapter agent the adapters. vLLM
    serves a base trained in 4 bits quantized the same way (bitsandbytes, in flight).
    """
    spec = adapter.spec
    model: dict[str, Any] = {
        "modelFormat": {"name": "tessera"},
        "runtime": config.serving_runtime,
        "storageUri": spec.base_model.uri,
    }
    if config.serving_runtime_kind == "vllm" and spec.base_model.quantization_bits == 4:
        model["args"] = ["--quantization=bitsandbytes"]
    metadata = _metadata(adapter.inference_service_name, adapter.metadata.namespace,
                         {"tessera.dev/base-model": dns_label(spec.base_model.uri.rstrip("/").rsplit("/", 1)[-1])},
                         None)
    metadata["annotations"] = {"serving.kserve.io/deploymentMode": "RawDeployment"}
    predictor: dict[str, Any] = {"minReplicas": 1, "model": model}
    if config.predictor_service_account:
        predictor["serviceAccountName"] = config.predictor_service_account
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }


def build_adapter(job: FineTuneJob, published: PublishedRecord) -> dict[str, Any]:
    """The Adapter for the artifact a job published (its `published.json`); not owned by the job."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": published.base_model.uri,
                      "name": published.base_model.name or job.spec.base_model.name,
                      "quantizationBits": job.spec.base_model.quantization.bits},
        "uri": published.uri,
        "sha256": published.sha256,
        "rank": published.rank,
        "task": published.task,
        "lineage": {
            "job": f"{job.metadata.namespace}/{job.metadata.name}",
            "datasetUri": job.spec.dataset.uri,
            "datasetSha256": published.dataset_sha256,
        },
        "metrics": published.metrics,
        "serving": {
            "inferenceService": job.inference_service_name,
            "createInferenceService": job.spec.serving.create_inference_service,
        },
        "credentialsSecret": job.spec.store.credentials_secret,
    }
    labels = {LABEL_JOB: job.metadata.name, LABEL_ADAPTER_VERSION: dns_label(published.version)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Adapter",
        "metadata": _metadata(published.name, job.metadata.namespace, labels, None),
        "spec": _without_nones(spec),
    }


def _without_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    return value


def render_objects(job: FineTuneJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """Everything the operator (and, through it, Argo) creates for `job`, in creation order."""
    workflow = build_workflow(job, config)
    objects = [build_job_configmap(job), workflow, *preview_training_objects(workflow)]
    if job.spec.serving.enabled and job.spec.serving.create_inference_service:
        adapter = Adapter.model_validate({
            "metadata": {"name": job.adapter_name, "namespace": job.metadata.namespace},
            "spec": {"baseModel": {"uri": job.spec.base_model.uri, "name": job.spec.base_model.name},
                     "uri": f"{job.spec.store.uri}/adapters/{job.metadata.namespace}/{job.adapter_name}",
                     "serving": {"inferenceService": job.inference_service_name},
                     "credentialsSecret": job.spec.store.credentials_secret},
        })
        objects.append(build_inference_service(adapter, config))
    return objects
