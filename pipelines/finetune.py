"""The `tessera-finetune` Argo WorkflowTemplate, authored with Hera: prepare → train → evaluate → publish.

Every step runs the project's own CLI against the job manifest, which the operator freezes into a
ConfigMap named after the Workflow (`{{workflow.name}}`) and every pod mounts at `/config`. A
ConfigMap rather than a raw input artifact because the training pods belong to the PyTorchJob,
not to Argo, and an artifact would reach only Argo's own pods.

The train step is a resource template that creates a Kubeflow `PyTorchJob`: one Master plus
`workers - 1` Workers, `gpusPerWorker` GPUs each as limits of the cluster's GPU resource
(`nvidia.com/gpu` unless the chart says otherwise), the job's node selector, tolerations and
priority class, the store credentials from the job's Secret, and the torchrun launch
(`torchrun --no-python tessera train …`: the Training Operator sets the `PET_*` variables torchrun
reads, and the trainer starts DeepSpeed inside those processes). Argo's success/failure
conditions use label-selector syntax over gjson paths, which cannot pick an entry of
`status.conditions` by its type (argo-workflows#7143, #2288); they read the Master replica's
counters instead, which the Training Operator sets together with the job's Succeeded/Failed
condition. The replicas never restart (`restartPolicy: Never`, `backoffLimit: 0`) so a failed
counter is final.

The manifest is text with `{{…}}` placeholders that Argo substitutes before creating the object;
integer and JSON parameters are substituted unquoted (`replicas: {{…}}`), so the rendered YAML
of the manifest is only valid once substituted, as in any Argo resource template.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from hera.workflows import (
    Container,
    Parameter,
    Resource,
    RetryStrategy,
    SecretEnvFrom,
    Step,
    Steps,
    WorkflowTemplate,
)
from hera.workflows import models as m
from tessera import __version__

TEMPLATE_NAME = "tessera-finetune"
DEFAULT_IMAGE = f"ghcr.io/tessera-ml/tessera-trainer:{__version__}"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_STORE_SECRET = "tessera-store"  # noqa: S105 (the name of a Secret, not a credential)
SERVICE_ACCOUNT = "tessera-pipeline"
JOB_FILE = "/config/job.yaml"
RUN_AS = 1000

# The template's interface: every parameter the operator passes, with the default the template uses.
PARAMETERS: dict[str, str] = {
    "job-name": "",
    "image": DEFAULT_IMAGE,
    "store-secret": DEFAULT_STORE_SECRET,
    "pytorchjob-name": "",
    "worker-replicas": "0",
    "nproc-per-node": "1",
    "gpus-per-worker": "0",
    "gpu-resource": DEFAULT_GPU_RESOURCE,
    "node-selector": "{}",
    "tolerations": "[]",
    "priority-class-name": "",
    "eval-pod-spec-patch": "{}",
}
# Substituted unquoted into the PyTorchJob manifest: integers and JSON values.
_RAW_PARAMETERS = ("worker-replicas", "node-selector", "tolerations")


def _param(name: str) -> str:
    return "{{workflow.parameters." + name + "}}"


POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
# HOME and the caches on the writable /tmp; the model hub is never reached from a cluster.
ENV: list[dict[str, str]] = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "HF_HOME", "value": "/tmp/hf"},
    {"name": "HF_HUB_OFFLINE", "value": "1"},
    {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]
VOLUME_MOUNTS: list[dict[str, Any]] = [
    {"name": "job-config", "mountPath": "/config", "readOnly": True},
    {"name": "tmp", "mountPath": "/tmp"},
]


STEP_VOLUMES: list[dict[str, Any]] = [
    {"name": "job-config", "configMap": {"name": "{{workflow.name}}"}},
    {"name": "tmp", "emptyDir": {}},
]


def _store_env_from() -> list[dict[str, Any]]:
    return [{"secretRef": {"name": _param("store-secret"), "optional": True}}]


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-dicts out in full: no `&id001` anchors in a manifest people read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def pytorchjob_manifest() -> str:
    """The PyTorchJob the train step creates, as Argo-templated YAML text."""
    labels = {"tessera.dev/job": _param("job-name"), "tessera.dev/step": "train"}
    pod_spec = {
        # The workflow's account carries the registry pull secret; training needs no API token.
        "serviceAccountName": "{{workflow.serviceAccountName}}",
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY_CONTEXT,
        "nodeSelector": _param("node-selector"),
        "tolerations": _param("tolerations"),
        "priorityClassName": _param("priority-class-name"),
        "volumes": [
            *STEP_VOLUMES,
            # NCCL and the data loader workers share tensors through /dev/shm.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        "containers": [
            {
                "name": "pytorch",  # the Training Operator finds the training container by this name
                "image": _param("image"),
                "command": ["torchrun", "--no-python", "tessera", "train", "-f", JOB_FILE],
                "env": ENV,
                "envFrom": _store_env_from(),
                "resources": {"limits": {_param("gpu-resource"): _param("gpus-per-worker")}},
                "securityContext": CONTAINER_SECURITY_CONTEXT,
                "volumeMounts": [*VOLUME_MOUNTS, {"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
    }

    def replica(replicas: int | str) -> dict[str, Any]:
        return {
            "replicas": replicas,
            "restartPolicy": "Never",
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        }

    manifest = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": _param("pytorchjob-name"), "labels": labels},
        "spec": {
            "nprocPerNode": _param("nproc-per-node"),
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(_param("worker-replicas"))},
        },
    }
    text = yaml.dump(manifest, Dumper=_PlainDumper, sort_keys=False, width=1000)
    raw = "|".join(re.escape(_param(name)) for name in _RAW_PARAMETERS)
    return re.sub(rf"'({raw})'", r"\1", text)


def _step_container(name: str) -> Container:
    """One container template for prepare, evaluate and publish: `tessera <step> -f /config/job.yaml`."""
    return Container(
        name=name,
        inputs=[Parameter(name="step"), Parameter(name="pod-spec-patch", default="{}")],
        image=_param("image"),
        command=["tessera"],
        args=["{{inputs.parameters.step}}", "-f", JOB_FILE],
        env=[m.EnvVar(name=e["name"], value=e["value"]) for e in ENV],
        env_from=[SecretEnvFrom(name=_param("store-secret"), optional=True)],
        resources=m.ResourceRequirements(requests={"cpu": m.Quantity("1"), "memory": m.Quantity("4Gi")}),
        security_context=m.SecurityContext.model_validate(CONTAINER_SECURITY_CONTEXT),
        volume_mounts=[m.VolumeMount.model_validate(v) for v in VOLUME_MOUNTS],
        # The evaluate step runs on the GPU pool: its placement and GPU come in as a JSON patch.
        pod_spec_patch="{{inputs.parameters.pod-spec-patch}}",
        # Pod errors (node lost, eviction) are retried; a step that exits non-zero failed for real.
        retry_strategy=RetryStrategy(limit=2, retry_policy="OnError"),
    )


def build_workflow_template() -> dict[str, Any]:
    """The WorkflowTemplate as the dict the chart ships (see `python -m tessera_pipelines`)."""
    with WorkflowTemplate(
        name=TEMPLATE_NAME,
        entrypoint="finetune",
        labels={"app.kubernetes.io/name": "tessera", "app.kubernetes.io/component": "pipeline"},
        annotations={"workflows.argoproj.io/description": "Tessera: prepare, train, evaluate and publish "
                     "one FineTuneJob (created by the Tessera operator)."},
        service_account_name=SERVICE_ACCOUNT,
        # Every step pod carries the job's label, as the training pods do: the chart's job NetworkPolicy selects by it.
        pod_metadata=m.Metadata(labels={"tessera.dev/job": _param("job-name"), "tessera.dev/step": "pipeline"}),
        arguments=[Parameter(name=name, value=value) for name, value in PARAMETERS.items()],
        security_context=m.PodSecurityContext.model_validate(POD_SECURITY_CONTEXT),
        volumes=[m.Volume.model_validate(v) for v in STEP_VOLUMES],
    ) as template:
        step = _step_container("tessera-step")
        train = Resource(
            name="train",
            action="create",
            set_owner_reference=True,
            manifest=pytorchjob_manifest(),
            success_condition="status.replicaStatuses.Master.succeeded > 0",
            failure_condition="status.replicaStatuses.Master.failed > 0",
        )
        with Steps(name="finetune"):
            Step(name="prepare", template=step, arguments={"step": "prepare"})
            Step(name="train", template=train)
            Step(
                name="evaluate",
                template=step,
                arguments={"step": "evaluate", "pod-spec-patch": _param("eval-pod-spec-patch")},
            )
            Step(name="publish", template=step, arguments={"step": "publish"})
    return template.to_dict()


def render_yaml() -> str:
    """The rendered WorkflowTemplate, as committed in `pipelines/workflowtemplate.yaml`."""
    header = "# Generated by `python -m tessera_pipelines` from pipelines/finetune.py: do not edit.\n"
    return header + yaml.safe_dump(build_workflow_template(), sort_keys=False, width=110)


def render_pytorchjob(parameters: dict[str, str], workflow_name: str) -> dict[str, Any]:
    """The PyTorchJob the train step creates for these workflow parameters (Argo's substitution)."""
    values = {**PARAMETERS, **parameters}
    text = pytorchjob_manifest().replace("{{workflow.name}}", workflow_name)
    for name, value in values.items():
        text = text.replace(_param(name), value)
    return yaml.safe_load(text)


def json_parameter(value: Any) -> str:
    """A JSON value on one line, as the raw parameters (node selector, tolerations) expect."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
