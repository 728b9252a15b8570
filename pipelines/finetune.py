"""The `tessera-finetune` Argo WorkflowTemplate, authored with Hera: [label →] prepare → train → evaluate → publish.

The label step runs only for a job with `spec.dataset.teacher` (parameter `teacher`); it and the
evaluate step read the teacher's key from the job's Secret (`teacher-secret`, key `TEACHER_API_KEY`).

Every step runs the project's own CLI against the job manifest, which the operator freezes into a
ConfigMap named after the Workflow (`{{workflow.name}}`) and every pod mounts at `/config`. A
ConfigMap rather than a raw input artifact because the training pods belong to the training job,
not to Argo, and an artifact would reach only Argo's own pods.

The train step creates the training job of the kind the `launcher` parameter names (the job's
`spec.distribution.launcher`, or the installation's default), through two conditional steps:

- `pytorchjob`: a Kubeflow Training Operator v1 `PyTorchJob`, one Master plus `workers - 1`
  Workers (container `pytorch`, where the operator sets the `PET_*` variables torchrun reads).
- `trainjob`: a Kubeflow Trainer v2 `TrainJob` (`numNodes` = workers, `numProcPerNode`,
  `resourcesPerNode`, image and command) on a `TrainingRuntime` of the same name that the step
  before it creates: the torch runtime's shape (one replicated job `node`, container `node`,
  label `trainer.kubeflow.org/trainjob-ancestor-step: trainer`) with Tessera's pod template. The
  runtime carries what the TrainJob API cannot say in a form stable across Trainer releases:
  the TrainJob's pod-override field was `podSpecOverrides` in 2.0, `podTemplateOverrides` in 2.1
  and `runtimePatches` from 2.2, while `runtimeRef` and `trainer` have kept their shape. The
  runtime is owned by the Workflow, so it goes with it.

Both kinds get the same pod: image and `torchrun --no-python tessera train` command, GPUs per
worker as limits of the cluster's GPU resource (`nvidia.com/gpu` unless the chart says
otherwise), the job's node selector, tolerations and priority class, the store credentials from
the job's Secret (envFrom), the non-root pod and container security contexts, /config, /tmp and
/dev/shm. Under Trainer v2 (>= 2.2 with the `TrainJobStatus` gate) the trainer also finds
`KUBEFLOW_TRAINER_SERVER_URL` and its token and CA there, and posts its progress (KEP-2779).

Restarts: a preempted or failed training pod is restarted in place (`restartPolicy: OnFailure`)
and training resumes from the last checkpoint in the store. `restart-limit` bounds the restarts:
the PyTorchJob's `runPolicy.backoffLimit` (the Training Operator sums the replicas' container
restarts) and the `node` Job's `backoffLimit` (the Job controller counts failed pods); the
operator passes `maxRestarts × workers`, since losing one node restarts every node's torchrun.

Success and failure, read from each kind's own status. Argo's `successCondition` and
`failureCondition` are Kubernetes label selectors whose keys are gjson paths into the object:
`path op value`, comma = and, a bare path = "exists", `!=` also matching a missing path. A key
must be a valid label key (letters, digits, `.`, `-`, `_`), so it cannot pick an entry of
`status.conditions` by its type (argo-workflows#7143, #2288), only by its index. So:

- PyTorchJob: success `status.replicaStatuses.Master.succeeded > 0`; failure
  `status.completionTime` set while the Master has not succeeded. Not `Master.failed > 0`: with
  restarts that counter is briefly 1 while a failed pod is replaced.
- TrainJob: `status.jobsStatus` mirrors the JobSet's replicated jobs, and the runtime has exactly
  one (`node`), so index 0 is that Job: success `status.jobsStatus.0.succeeded > 0`, failure
  `status.jobsStatus.0.failed > 0`. A Job fails only once its backoffLimit is spent and the
  runtime has no JobSet-level restarts, so the failed counter is final. The TrainJob's own
  `Complete`/`Failed` conditions would sit at index 0 only for a TrainJob never suspended (Kueue
  suspends first), so they are not used here; the operator reads them to explain a failure.

The manifests are text with `{{…}}` placeholders that Argo substitutes before creating the
object; integer and JSON parameters are substituted unquoted (`replicas: {{…}}`), so the rendered
YAML of a manifest is only valid once substituted, as in any Argo resource template.
"""

from __future__ import annotations

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
from tessera_pipelines.interface import (
    JOB_FILE,
    PARAMETERS,
    SERVICE_ACCOUNT,
    TEACHER_KEY_ENV,
    TEMPLATE_NAME,
)

RUN_AS = 1000

TRAINER_API = "trainer.kubeflow.org/v1alpha1"

# Substituted unquoted into the training manifests: integers and JSON values.
_RAW_PARAMETERS = ("num-nodes", "worker-replicas", "restart-limit", "node-selector", "tolerations")
TRAIN_COMMAND = ["torchrun", "--no-python", "tessera", "train", "-f", JOB_FILE]

CONDITIONS: dict[str, tuple[str, str]] = {
    # kind: (successCondition, failureCondition); see the module docstring for why these paths.
    "pytorchjob": ("status.replicaStatuses.Master.succeeded > 0",
                   "status.completionTime,status.replicaStatuses.Master.succeeded != 1"),
    "trainjob": ("status.jobsStatus.0.succeeded > 0", "status.jobsStatus.0.failed > 0"),
}


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


def _labels() -> dict[str, str]:
    return {"tessera.dev/job": _param("job-name"), "tessera.dev/step": "train"}


def _pod_template(container_name: str) -> dict[str, Any]:
    """The training pod of either kind: `container_name` is where the launcher expects the trainer."""
    return {
        "metadata": {"labels": _labels()},
        "spec": {
            # The workflow's account carries the registry pull secret; training needs no API token.
            # (Trainer v2 mounts its own audience-bound token for progress reports.)
            "serviceAccountName": "{{workflow.serviceAccountName}}",
            "automountServiceAccountToken": False,
            "restartPolicy": "OnFailure",
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
                    "name": container_name,
                    "image": _param("image"),
                    "command": TRAIN_COMMAND,
                    "env": ENV,
                    "envFrom": _store_env_from(),
                    "resources": _gpu_limits(),
                    "securityContext": CONTAINER_SECURITY_CONTEXT,
                    "volumeMounts": [*VOLUME_MOUNTS, {"name": "dshm", "mountPath": "/dev/shm"}],
                }
            ],
        },
    }


def _gpu_limits() -> dict[str, Any]:
    return {"limits": {_param("gpu-resource"): _param("gpus-per-worker")}}


def _manifest_text(manifest: dict[str, Any], raw_parameters: tuple[str, ...] = _RAW_PARAMETERS) -> str:
    text = yaml.dump(manifest, Dumper=_PlainDumper, sort_keys=False, width=1000)
    raw = "|".join(re.escape(_param(name)) for name in raw_parameters)
    return re.sub(rf"'({raw})'", r"\1", text)


def pytorchjob_manifest() -> str:
    """The PyTorchJob the train step creates (launcher `pytorchjob`), as Argo-templated YAML text."""

    def replica(replicas: int | str) -> dict[str, Any]:
        # The Training Operator finds the training container by the name `pytorch`.
        return {"replicas": replicas, "restartPolicy": "OnFailure", "template": _pod_template("pytorch")}

    return _manifest_text({
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": _param("training-job-name"), "labels": _labels()},
        "spec": {
            "nprocPerNode": _param("nproc-per-node"),
            "runPolicy": {"backoffLimit": _param("restart-limit"), "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(_param("worker-replicas"))},
        },
    })


def trainingruntime_manifest() -> str:
    """The job's TrainingRuntime (launcher `trainjob`): the torch runtime's shape, Tessera's pod."""
    return _manifest_text({
        "apiVersion": TRAINER_API,
        "kind": "TrainingRuntime",
        "metadata": {"name": _param("training-job-name"),
                     "labels": {**_labels(), "trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [{
                "name": "node",
                "template": {
                    "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"backoffLimit": _param("restart-limit"), "template": _pod_template("node")},
                },
            }]}},
        },
    })


def trainjob_manifest() -> str:
    """The TrainJob the train step creates (launcher `trainjob`) on the job's TrainingRuntime."""
    return _manifest_text({
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {"name": _param("training-job-name"), "labels": _labels()},
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                           "name": _param("training-job-name")},
            "trainer": {
                "image": _param("image"),
                "command": TRAIN_COMMAND,
                "numNodes": _param("num-nodes"),
                "numProcPerNode": _param("nproc-per-node"),
                "resourcesPerNode": _gpu_limits(),
            },
        },
    }, (*_RAW_PARAMETERS, "nproc-per-node"))  # an integer here; the PyTorchJob's nprocPerNode is a string


def _training_resource(kind: str, manifest: str) -> Resource:
    success, failure = CONDITIONS[kind]
    return Resource(name=kind, action="create", set_owner_reference=True, manifest=manifest,
                    success_condition=success, failure_condition=failure)


def _teacher_key_env() -> m.EnvVar:
    """The teacher's API key from the job's Secret (spec.dataset.teacher.credentialsSecret), if it has one."""
    return m.EnvVar(name=TEACHER_KEY_ENV, value_from=m.EnvVarSource(secret_key_ref=m.SecretKeySelector(
        name=_param("teacher-secret"), key=TEACHER_KEY_ENV, optional=True)))


def _step_container(name: str, *, teacher_key: bool = False) -> Container:
    """One container template for the steps in pods of their own: `tessera <step> -f /config/job.yaml`.
    Only the steps that ask the teacher (`label`, and `evaluate` for teacher vs student) see its key."""
    return Container(
        name=name,
        inputs=[Parameter(name="step"), Parameter(name="pod-spec-patch", default="{}")],
        image=_param("image"),
        command=["tessera"],
        args=["{{inputs.parameters.step}}", "-f", JOB_FILE],
        env=[m.EnvVar(name=e["name"], value=e["value"]) for e in ENV] + ([_teacher_key_env()] if teacher_key else []),
        env_from=[SecretEnvFrom(name=_param("store-secret"), optional=True)],
        resources=m.ResourceRequirements(requests={"cpu": m.Quantity("1"), "memory": m.Quantity("4Gi")}),
        security_context=m.SecurityContext.model_validate(CONTAINER_SECURITY_CONTEXT),
        volume_mounts=[m.VolumeMount.model_validate(v) for v in VOLUME_MOUNTS],
        # The evaluate step runs on the GPU pool: its placement and GPU come in as a JSON patch.
        pod_spec_patch="{{inputs.parameters.pod-spec-patch}}",
        # A failed step's last log lines (the CLI's one-line error) become its termination message,
        # which Argo puts in the node's message and the operator in the job's status.error.
        termination_message_policy="FallbackToLogsOnError",
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
        teacher_step = _step_container("tessera-teacher-step", teacher_key=True)
        runtime = Resource(name="trainingruntime", action="create", set_owner_reference=True,
                           manifest=trainingruntime_manifest())
        pytorchjob = _training_resource("pytorchjob", pytorchjob_manifest())
        trainjob = _training_resource("trainjob", trainjob_manifest())
        launcher = _param("launcher")
        with Steps(name="train") as train:
            Step(name="trainingruntime", template=runtime, when=f"{launcher} == trainjob")
            with train.parallel():
                Step(name="pytorchjob", template=pytorchjob, when=f"{launcher} == pytorchjob")
                Step(name="trainjob", template=trainjob, when=f"{launcher} == trainjob")
        with Steps(name="finetune"):
            Step(name="label", template=teacher_step, arguments={"step": "label"},
                 when=f"{_param('teacher')} == true")
            Step(name="prepare", template=step, arguments={"step": "prepare"})
            Step(name="train", template=train)
            Step(
                name="evaluate",
                template=teacher_step,
                arguments={"step": "evaluate", "pod-spec-patch": _param("eval-pod-spec-patch")},
            )
            Step(name="publish", template=step, arguments={"step": "publish"})
    return template.to_dict()


def render_yaml() -> str:
    """The rendered WorkflowTemplate, as committed in `pipelines/workflowtemplate.yaml`."""
    header = "# Generated by `python -m tessera_pipelines` from pipelines/finetune.py: do not edit.\n"
    return header + yaml.safe_dump(build_workflow_template(), sort_keys=False, width=110)


MANIFESTS = {"pytorchjob": (pytorchjob_manifest,), "trainjob": (trainingruntime_manifest, trainjob_manifest)}


def render_training_objects(parameters: dict[str, str], workflow_name: str) -> list[dict[str, Any]]:
    """What the train step creates for these workflow parameters (Argo's substitution), in order."""
    values = {**PARAMETERS, **parameters}
    objects = []
    for manifest in MANIFESTS[values["launcher"]]:
        text = manifest().replace("{{workflow.name}}", workflow_name)
        for name, value in values.items():
            text = text.replace(_param(name), value)
        objects.append(yaml.safe_load(text))
    return objects
