"""The pure parts of the operator and the pipeline: what they build is what a real API server accepts.

Every object is validated against the upstream CRD schemas vendored in tests/crds (strict: unknown
fields are errors) and, where it becomes one, the generated Tessera CRD.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tessera.api import Adapter, load_job
from tessera.api.records import EvaluationReport, PublishedRecord
from tessera.errors import InvalidSpecError
from tessera_operator.builders import (
    build_adapter,
    build_inference_service,
    build_job_configmap,
    build_workflow,
    effective_job,
    owner_reference,
    preview_training_objects,
    render_objects,
    submitted_generation,
    training_job_name,
    workflow_name,
    workflow_parameters,
)
from tessera_operator.config import OperatorConfig
from tessera_operator.serving import (
    AdapterApi,
    AdapterApiError,
    Backoff,
    Replica,
    adapter_phase,
    backoff_seconds,
    is_loaded,
    replica_url,
    sync_replica,
)
from tessera_operator.status import Observation, derive_status, merge_conditions, promotion
from tessera_pipelines.finetune import CONDITIONS, build_workflow_template, render_yaml
from tessera_pipelines.interface import PARAMETERS

from tests.crds.schemas import validate_against_crd
from tests.operator.controllers import condition_holds

REPO = Path(__file__).resolve().parents[2]
# The placement the sample job asks for, allowed by the admin (the chart's tenancy.scheduling values).
PLACEMENT = {"allowed_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
             "allowed_node_selectors": {"nvidia.com/gpu.product": ["A100-SXM4-80GB"]},
             "allowed_priority_classes": ["training-high"]}
PLACEMENT_ENV = {f"TESSERA_{key.upper()}": json.dumps(value) for key, value in PLACEMENT.items()}
CONFIG = OperatorConfig(**PLACEMENT)
BOTH = OperatorConfig(launcher="pytorchjob", other_launchers="trainjob", **PLACEMENT)
# The TrainJob CRD of Kubeflow Trainer v2.3.0 (with status.trainerStatus), beside the older one
# vendored from ../shared/crds: a TrainJob Tessera builds must be valid for both.
TRAINJOB_CRD_V2_3 = REPO / "tests" / "crds" / "trainer-v2.3.0" / "trainer.kubeflow.org_trainjobs.yaml"


def pytorchjob_of(job, config=CONFIG) -> dict:
    [pytorchjob] = preview_training_objects(build_workflow(job, config))
    assert pytorchjob["kind"] == "PyTorchJob"
    return pytorchjob


def job_manifest(**spec_overrides: object) -> dict:
    spec = {
        "baseModel": {"uri": "s3://tessera/models/llama-3.1-8b-instruct", "name": "meta-llama/Llama-3.1-8B-Instruct"},
        "dataset": {"uri": "s3://tessera/datasets/fpb.csv", "task": "sentiment"},
        "distribution": {"workers": 3, "gpusPerWorker": 4, "zeroStage": 2},
        "scheduling": {
            "nodeSelector": {"nvidia.com/gpu.product": "A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training-high",
        },
        "serving": {"enabled": True, "promotion": {"metric": "accuracy", "minImprovement": 0.05}},
        "store": {"uri": "s3://tessera", "credentialsSecret": "team-a-store"},
        **spec_overrides,
    }
    return {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "fpb-sentiment", "namespace": "team-a", "uid": "8d2c5a1e-0000-4000-8000-000000000001",
                     "generation": 1},
        "spec": spec,
    }


@pytest.fixture
def job():
    return effective_job(job_manifest(), CONFIG)


def test_workflow_template_is_valid_and_runs_the_four_steps_in_order():
    template = build_workflow_template()
    assert validate_against_crd(template) == []
    entry = next(t for t in template["spec"]["templates"] if t["name"] == template["spec"]["entrypoint"])
    assert [group[0]["name"] for group in entry["steps"]] == ["label", "prepare", "train", "evaluate", "publish"]
    assert entry["steps"][0][0]["when"] == "{{workflow.parameters.teacher}} == true"
    step = next(t for t in template["spec"]["templates"] if t["name"] == "tessera-step")
    assert step["container"]["command"] == ["tessera"]
    assert step["container"]["args"] == ["{{inputs.parameters.step}}", "-f", "/config/job.yaml"]
    assert step["container"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    templates = {t["name"]: t for t in template["spec"]["templates"]}
    # The train step creates the launcher's kind: steps chosen by `when` on the launcher parameter.
    train = [step for group in templates["train"]["steps"] for step in group]
    assert {s["name"]: s["when"] for s in train} == {
        "trainingruntime": "{{workflow.parameters.launcher}} == trainjob",
        "pytorchjob": "{{workflow.parameters.launcher}} == pytorchjob",
        "trainjob": "{{workflow.parameters.launcher}} == trainjob",
    }
    for kind in ("pytorchjob", "trainjob"):
        resource = templates[kind]["resource"]
        assert resource["action"] == "create" and resource["setOwnerReference"] is True
        assert (resource["successCondition"], resource["failureCondition"]) == CONDITIONS[kind]
    assert templates["trainingruntime"]["resource"]["setOwnerReference"] is True


def test_committed_workflow_template_yaml_is_in_sync_with_the_code():
    committed = (REPO / "pipelines" / "workflowtemplate.yaml").read_text()
    rendered = subprocess.run([sys.executable, "-m", "tessera_pipelines"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout
    assert rendered == render_yaml()
    assert committed == rendered, "run: python -m tessera_pipelines > pipelines/workflowtemplate.yaml"


def test_workflow_references_the_template_with_every_parameter_and_is_owned_by_the_job(job):
    owner = owner_reference(job_manifest())
    workflow = build_workflow(job, CONFIG, owner)
    assert validate_against_crd(workflow) == []
    assert workflow["metadata"]["name"] == "ftj-fpb-sentiment" == workflow_name("fpb-sentiment")
    assert workflow["metadata"]["ownerReferences"] == [owner]
    assert owner["uid"] == "8d2c5a1e-0000-4000-8000-000000000001" and owner["controller"] is True
    assert workflow["spec"]["workflowTemplateRef"] == {"name": "tessera-finetune"}
    names = [p["name"] for p in workflow["spec"]["arguments"]["parameters"]]
    assert sorted(names) == sorted(PARAMETERS), "the Workflow must pass exactly the template's parameters"


def test_pytorchjob_created_by_the_train_step_matches_the_job(job):
    pytorchjob = pytorchjob_of(job)
    assert validate_against_crd(pytorchjob) == []
    assert pytorchjob["metadata"]["name"] == training_job_name("fpb-sentiment")
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2  # 3 workers in all
    assert pytorchjob["spec"]["nprocPerNode"] == "4"
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert container["command"][:2] == ["torchrun", "--no-python"]
    assert container["command"][2:] == ["tessera", "train", "-f", "/config/job.yaml"]
    assert container["envFrom"] == [{"secretRef": {"name": "team-a-store", "optional": True}}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "training-high"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "job-config", "configMap": {"name": "ftj-fpb-sentiment"}} in pod["volumes"]


def test_trainjob_runs_the_same_pod_as_the_pytorchjob_on_its_own_runtime():
    """Launcher `trainjob`: a TrainingRuntime (Tessera's pod) and a TrainJob on it, valid for the
    TrainJob CRD vendored from ../shared/crds and for Trainer v2.3.0's."""
    job = effective_job(job_manifest(distribution={"launcher": "trainjob", "workers": 3, "gpusPerWorker": 4}), BOTH)
    runtime, trainjob = preview_training_objects(build_workflow(job, BOTH))
    assert [runtime["kind"], trainjob["kind"]] == ["TrainingRuntime", "TrainJob"]
    assert validate_against_crd(runtime) == []
    assert validate_against_crd(trainjob) == []
    assert validate_against_crd(trainjob, TRAINJOB_CRD_V2_3) == []
    name = training_job_name("fpb-sentiment")
    assert trainjob["metadata"]["name"] == runtime["metadata"]["name"] == name
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": name}
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "4"}}
    # The torch runtime's shape: one replicated job `node`, its container `node`, the trainer step.
    [replicated] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    assert replicated["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = replicated["template"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert (trainer["image"], trainer["command"]) == (container["image"], container["command"])
    # Same command, image, resources, placement, credentials and non-root settings as the PyTorchJob.
    pytorch_pod = pytorchjob_of(effective_job(job_manifest(), BOTH), BOTH)["spec"]["pytorchReplicaSpecs"]["Worker"][
        "template"]
    assert pod["spec"]["containers"][0] | {"name": "pytorch"} == pytorch_pod["spec"]["containers"][0]
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == \
        {k: v for k, v in pytorch_pod["spec"].items() if k != "containers"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("launcher", ["pytorchjob", "trainjob"])
def test_training_pods_restart_a_bounded_number_of_times(launcher):
    job = effective_job(job_manifest(distribution={"launcher": launcher, "workers": 3, "maxRestarts": 2}), BOTH)
    objects = preview_training_objects(build_workflow(job, BOTH))
    if launcher == "pytorchjob":
        [pytorchjob] = objects
        limit = pytorchjob["spec"]["runPolicy"]["backoffLimit"]
        policies = {r["restartPolicy"] for r in pytorchjob["spec"]["pytorchReplicaSpecs"].values()}
    else:
        replicated = objects[0]["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
        limit, policies = replicated["backoffLimit"], {replicated["template"]["spec"]["restartPolicy"]}
    assert limit == 6  # 2 restarts of all 3 workers
    assert policies == {"OnFailure"}
    assert effective_job(job_manifest(), CONFIG).spec.distribution.max_restarts == 3  # the default


def test_launcher_defaults_to_the_installations_and_must_be_enabled():
    assert effective_job(job_manifest(), CONFIG).spec.distribution.launcher == "pytorchjob"
    trainjob = OperatorConfig(launcher="trainjob", **PLACEMENT)
    assert effective_job(job_manifest(), trainjob).spec.distribution.launcher == "trainjob"
    with pytest.raises(InvalidSpecError) as refused:
        effective_job(job_manifest(distribution={"launcher": "trainjob"}), CONFIG)
    assert "spec.distribution.launcher: trainjob is not enabled" in str(refused.value.problems)
    with pytest.raises(InvalidSpecError):
        effective_job(job_manifest(distribution={"launcher": "mpijob"}), BOTH)


# Statuses each kind's controller writes (shapes from the Training Operator v1.9 and Trainer v2.3 sources).
PYTORCHJOB_STATUSES = {
    "running": ({"replicaStatuses": {"Master": {"active": 1}}}, None),
    # A failed pod being replaced: the counter is briefly 1, the job goes on.
    "restarting": ({"replicaStatuses": {"Master": {"failed": 1}}, "conditions": [{"type": "Restarting"}]}, None),
    "succeeded": ({"replicaStatuses": {"Master": {"succeeded": 1}}, "completionTime": "t"}, "success"),
    "failed": ({"replicaStatuses": {"Master": {"active": 0}}, "completionTime": "t"}, "failure"),
}
TRAINJOB_STATUSES = {
    "running": ({"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0,
                                 "suspended": 0}]}, None),
    "succeeded": ({"jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 1, "failed": 0,
                                   "suspended": 0}], "conditions": [{"type": "Complete", "status": "True"}]},
                  "success"),
    "failed": ({"jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 1,
                                "suspended": 0}], "conditions": [{"type": "Failed", "status": "True"}]}, "failure"),
}


@pytest.mark.parametrize(("kind", "state"), [("pytorchjob", s) for s in PYTORCHJOB_STATUSES] +
                         [("trainjob", s) for s in TRAINJOB_STATUSES])
def test_argo_reads_success_and_failure_from_each_kinds_own_status(kind, state):
    """The train step's conditions, evaluated as Argo does (label selectors over gjson paths)."""
    status, expected = (PYTORCHJOB_STATUSES if kind == "pytorchjob" else TRAINJOB_STATUSES)[state]
    success, failure = CONDITIONS[kind]
    for requirement in (success + "," + failure).split(","):
        key = requirement.split()[0]
        assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key), f"{key}: not a label key"
    obj = {"status": status}
    outcome = "failure" if condition_holds(failure, obj) else "success" if condition_holds(success, obj) else None
    assert outcome == expected


def test_single_cpu_worker_gets_no_worker_replicas_and_no_gpu():
    job = effective_job(job_manifest(distribution={"workers": 1, "gpusPerWorker": 0}, scheduling={}), CONFIG)
    pytorchjob = pytorchjob_of(job)
    assert validate_against_crd(pytorchjob) == []
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 0
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "resources"]["limits"] == {"nvidia.com/gpu": "0"}
    parameters = {p["name"]: p["value"] for p in build_workflow(job, CONFIG)["spec"]["arguments"]["parameters"]}
    assert parameters["eval-pod-spec-patch"] == "{}"  # CPU evaluation: no placement on the GPU pool


def test_gpu_evaluation_lands_on_the_gpu_pool(job):
    parameters = {p["name"]: p["value"] for p in build_workflow(job, CONFIG)["spec"]["arguments"]["parameters"]}
    patch = json.loads(parameters["eval-pod-spec-patch"])
    assert patch["containers"] == [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
    assert patch["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}


def test_installation_gpu_resource_and_image_reach_the_pods(job):
    config = OperatorConfig(gpu_resource="amd.com/gpu", trainer_image="registry.bank.internal/tessera-trainer:1",
                            **PLACEMENT)
    pytorchjob = pytorchjob_of(job, config)
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"amd.com/gpu": "4"}
    assert container["image"] == "registry.bank.internal/tessera-trainer:1"


def test_configmap_freezes_the_validated_spec_with_defaults(job):
    configmap = build_job_configmap(job, owner_reference(job_manifest()))
    frozen = yaml.safe_load(configmap["data"]["job.yaml"])
    assert frozen["metadata"] == {"name": "fpb-sentiment", "namespace": "team-a"}
    assert frozen["spec"]["lora"]["rank"] == 8  # a default, written out
    assert load_job(configmap["data"]["job.yaml"]).spec == job.spec
    # Which generation of the spec it froze: a retried submit reports that one, not a newer edit.
    assert submitted_generation(configmap) == 1
    assert submitted_generation(build_workflow(job, CONFIG)) == 1


def test_jobs_without_a_store_get_the_installations_store_and_secret():
    manifest = job_manifest()
    del manifest["spec"]["store"]
    # Tenancy off: the sample's data lies in another bucket (tests/operator/test_tenancy.py has the rules).
    installation = OperatorConfig(store_uri="s3://bank-tessera", store_secret="bank-store",  # noqa: S106
                                  tenancy=False, **PLACEMENT)
    job = effective_job(manifest, installation)
    assert job.spec.store.uri == "s3://bank-tessera"
    assert job.spec.store.credentials_secret == installation.store_secret
    with pytest.raises(InvalidSpecError) as error:  # with no installation store, s3 data needs a secret
        effective_job(manifest, CONFIG)
    assert "spec.store.credentialsSecret" in str(error.value)


def test_inference_service_names_the_runtime_and_gives_it_no_credential():
    adapter = Adapter.model_validate(yaml.safe_load((REPO / "examples" / "adapter.yaml").read_text()))
    isvc = build_inference_service(adapter, CONFIG)
    assert validate_against_crd(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "tessera"} and model["runtime"] == "tessera"
    assert model["storageUri"] == adapter.spec.base_model.uri
    # The storage initializer brings the base model and the agent the adapters: the server needs no Secret.
    assert "envFrom" not in model and "args" not in model
    assert isvc["metadata"]["name"] == adapter.inference_service_name
    assert "ownerReferences" not in isvc["metadata"]  # shared by all adapters of the base model


@pytest.mark.parametrize(("kind", "bits", "args"), [("vllm", 4, ["--quantization=bitsandbytes"]), ("vllm", 8, None),
                                                    ("vllm", None, None), ("tessera", 4, None)])
def test_vllm_serves_a_four_bit_base_quantized_with_bitsandbytes(kind, bits, args):
    document = yaml.safe_load((REPO / "examples" / "adapter.yaml").read_text())
    document["spec"]["baseModel"]["quantizationBits"] = bits
    config = OperatorConfig(serving_runtime="tessera-vllm", serving_runtime_kind=kind, **PLACEMENT)
    isvc = build_inference_service(Adapter.model_validate(document), config)
    assert validate_against_crd(isvc) == []
    assert isvc["spec"]["predictor"]["model"].get("args") == args


def test_a_job_whose_adapter_the_runtime_cannot_serve_is_refused_naming_field_and_runtime():
    config = OperatorConfig.from_env({"TESSERA_SERVING_RUNTIME_KIND": "vllm", "TESSERA_MAX_LORA_RANK": "16",
                                      "TESSERA_TARGET_MODULES": json.dumps(["q_proj", "v_proj"]), **PLACEMENT_ENV})
    manifest = job_manifest(lora={"rank": 32, "targetModules": ["q_proj", "v_proj", "c_attn"]})
    with pytest.raises(InvalidSpecError) as error:
        effective_job(manifest, config)
    assert [p.split(":")[0] for p in error.value.problems] == ["spec.lora.rank", "spec.lora.targetModules"]
    assert "32 is above 16, the highest LoRA rank the vllm runtime serves" in error.value.problems[0]
    assert "['c_attn'] are not modules the vllm runtime applies LoRA to" in error.value.problems[1]
    # Within the runtime's limits, or not to be served, it runs.
    effective_job(job_manifest(lora={"rank": 16, "targetModules": ["q_proj"]}), config)
    unserved = job_manifest(lora={"rank": 32}, serving={"enabled": False})
    assert effective_job(unserved, config).spec.lora.rank == 32


def test_adapter_from_a_published_job_is_labelled_not_owned_and_valid(job):
    published = PublishedRecord.read({
        "name": "fpb-sentiment", "version": "v20260101-120000",
        "uri": "s3://tessera/adapters/team-a/fpb-sentiment/v20260101-120000", "sha256": "a" * 64,
        "baseModel": {"uri": job.spec.base_model.uri, "name": job.spec.base_model.name},
        "task": "sentiment", "rank": 8, "metrics": {"accuracy": 0.81}, "datasetSha256": "b" * 64,
        "checkpoint": "jobs/team-a/fpb-sentiment/checkpoints/step-00000010",
    })
    adapter = build_adapter(job, published)
    assert validate_against_crd(adapter) == []
    assert Adapter.model_validate(adapter).spec.uri == published.uri
    assert adapter["metadata"]["labels"]["tessera.dev/job"] == "fpb-sentiment"
    assert "ownerReferences" not in adapter["metadata"]
    assert adapter["spec"]["lineage"] == {"job": "team-a/fpb-sentiment", "datasetUri": job.spec.dataset.uri,
                                          "datasetSha256": "b" * 64}
    assert adapter["spec"]["credentialsSecret"] == "team-a-store"
    assert adapter["spec"]["baseModel"]["quantizationBits"] == job.spec.base_model.quantization.bits == 4


def test_render_prints_every_object_valid(job):
    kinds = [obj["kind"] for obj in render_objects(job, CONFIG)]
    assert kinds == ["ConfigMap", "Workflow", "PyTorchJob", "InferenceService"]
    for obj in render_objects(job, CONFIG):
        if obj["kind"] != "ConfigMap":
            assert validate_against_crd(obj) == [], obj["kind"]


def test_render_command_prints_yaml_documents_and_refuses_a_bad_spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_manifest()))
    done = subprocess.run([sys.executable, "-m", "tessera", "render", "-f", str(path), "--set", "spec.lora.rank=16"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **PLACEMENT_ENV})
    assert done.returncode == 0, done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d["kind"] for d in documents] == ["ConfigMap", "Workflow", "PyTorchJob", "InferenceService"]
    assert yaml.safe_load(documents[0]["data"]["job.yaml"])["spec"]["lora"]["rank"] == 16
    # The installation's launcher (TESSERA_LAUNCHER, as the chart sets it) shows in what is printed.
    v2 = subprocess.run([sys.executable, "-m", "tessera", "render", "-f", str(path)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, **PLACEMENT_ENV, "TESSERA_LAUNCHER": "trainjob"})
    assert v2.returncode == 0, v2.stderr
    assert [d["kind"] for d in yaml.safe_load_all(v2.stdout) if d] == [
        "ConfigMap", "Workflow", "TrainingRuntime", "TrainJob", "InferenceService"]
    bad = subprocess.run([sys.executable, "-m", "tessera", "render", "-f", str(path), "--set", "spec.lora.rank=0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "spec.lora.rank" in bad.stderr and "Traceback" not in bad.stderr


def workflow_with(phases: dict[str, str], phase: str = "Running", messages: dict[str, str] | None = None) -> dict:
    nodes = {f"n-{step}": {"id": f"n-{step}", "name": f"wf.{step}", "displayName": step, "type": "Pod",
                           "phase": node_phase, "message": (messages or {}).get(step, "")}
             for step, node_phase in phases.items()}
    return {"spec": {}, "status": {"phase": phase, "nodes": nodes}}


def test_status_follows_the_running_step_and_the_trainers_progress(job):
    progress = {"step": 30, "totalSteps": 120, "epoch": 0.5, "percent": 25.0, "loss": 1.25, "etaSeconds": 300,
                "trainedTokens": 61440, "deviceHours": 0.5, "checkpoints": ["jobs/team-a/fpb/checkpoints/step-25"]}
    obs = Observation(workflow=workflow_with({"prepare": "Succeeded", "train": "Running"}), progress=progress)
    update = derive_status(job.model_copy(update={"spec": job.spec.model_copy(update={
        "cost": job.spec.cost.model_copy(update={"price_per_device_hour": 4.0})})}),
        {"phase": "Validating"}, obs, "2026-01-01T00:00:00Z")
    status = update.status
    assert status["phase"] == "Training"
    assert status["progress"] == {"percent": 25.0, "step": 30, "totalSteps": 120, "epoch": 0.5, "etaSeconds": 300.0}
    assert status["metrics"]["trainLoss"] == 1.25
    assert status["trainedTokens"] == 61440 and status["gpuHours"] == 0.5
    assert status["cost"] == {"amount": 2.0, "currency": "USD"}
    assert status["checkpoints"] == ["jobs/team-a/fpb/checkpoints/step-25"]
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"] == ["DataPrepared"]
    assert [(e.type, e.reason) for e in update.events] == [("Normal", "Training")]


def test_failed_step_fails_the_job_with_its_reason_and_message(job):
    obs = Observation(workflow=workflow_with({"prepare": "Failed"}, phase="Failed",
                                             messages={"prepare": "Error (exit code 1): 3 rows are bad"}))
    update = derive_status(job, {"phase": "Validating"}, obs, "2026-01-01T00:00:00Z")
    assert update.status["phase"] == "Failed"
    assert update.status["error"] == {"code": "PrepareFailed", "message": "Error (exit code 1): 3 rows are bad"}
    assert [(e.type, e.reason) for e in update.events] == [("Warning", "PrepareFailed")]


def test_label_step_shows_its_progress_in_rows_and_its_failure_reason(job):
    """The label step writes the trainer's progress shape counted in rows; a refused teacher fails the job
    with the step's last log line (the container's termination message) as the error."""
    progress = {"stage": "label", "step": 120, "totalSteps": 300, "percent": 40.0, "etaSeconds": 90.0}
    running = derive_status(job, {"phase": "Pending"},
                            Observation(workflow=workflow_with({"label": "Running"}), progress=progress),
                            "2026-01-01T00:00:00Z")
    assert running.status["phase"] == "Validating"
    assert running.status["progress"] == {"percent": 40.0, "step": 120, "totalSteps": 300, "etaSeconds": 90.0}
    reason = "error: teacher 'llama-70b' at vllm.models.svc refused the API key (HTTP 401)"
    obs = Observation(workflow=workflow_with({"label": "Failed"}, phase="Failed",
                                             messages={"label": f"Error (exit code 1): {reason}"}))
    update = derive_status(job, {"phase": "Validating"}, obs, "2026-01-01T00:00:00Z")
    assert update.status["phase"] == "Failed"
    assert update.status["error"] == {"code": "LabelFailed", "message": f"Error (exit code 1): {reason}"}
    assert [(e.type, e.reason) for e in update.events] == [("Warning", "LabelFailed")]


def test_training_failure_says_what_the_training_operator_says(job):
    pytorchjob = {"status": {"conditions": [{"type": "Failed", "status": "True",
                                             "message": "1 Master replica(s) failed"}]}}
    obs = Observation(workflow=workflow_with({"prepare": "Succeeded", "train": "Failed"}, phase="Failed",
                                             messages={"train": "failed condition: ..."}), training_job=pytorchjob)
    status = derive_status(job, {"phase": "Training"}, obs, "2026-01-01T00:00:00Z").status
    assert status["error"] == {"code": "TrainingFailed", "message": "1 Master replica(s) failed"}


def test_success_needs_the_publish_record_and_then_names_the_adapter(job):
    workflow = workflow_with({s: "Succeeded" for s in ("prepare", "train", "evaluate", "publish")}, phase="Succeeded")
    report = evaluation({"accuracy": 0.8, "eval_loss": 0.4}, {"accuracy": 0.5})
    waiting = derive_status(job, {"phase": "Publishing"}, Observation(workflow=workflow, report=report), "t")
    assert waiting.status["phase"] == "Publishing"
    published = PublishedRecord(name="fpb-sentiment", version="v1", uri="s3://tessera/adapters/team-a/fpb-sentiment/v1",
                                sha256="a" * 64, base_model={"uri": job.spec.base_model.uri}, task="sentiment", rank=8,
                                checkpoint="jobs/team-a/fpb-sentiment/checkpoints/step-00000010")
    done = derive_status(job, {"phase": "Publishing"}, Observation(workflow=workflow, report=report,
                                                                   published=published), "t")
    assert done.status["phase"] == "Succeeded"
    assert done.status["adapterRef"] == {"name": "fpb-sentiment", "uri": published.uri}
    assert done.status["metrics"]["adapter"] == {"accuracy": 0.8, "eval_loss": 0.4}
    assert done.status["metrics"]["base"] == {"accuracy": 0.5} and done.status["metrics"]["evalLoss"] == 0.4
    assert done.status["progress"]["percent"] == 100.0


def test_stopped_workflow_cancels_the_job(job):
    workflow = workflow_with({"prepare": "Succeeded", "train": "Failed"}, phase="Failed")
    workflow["spec"]["shutdown"] = "Terminate"
    assert derive_status(job, {}, Observation(workflow=workflow), "t").status["phase"] == "Cancelled"


def evaluation(adapter: dict, base: dict | None) -> EvaluationReport:
    return EvaluationReport(task="sentiment", metric="accuracy", adapter=adapter, base=base, samples=10)


def test_promotion_rule(job):
    report = evaluation({"accuracy": 0.80, "mse": 2.0}, {"accuracy": 0.70, "mse": 3.0})
    assert promotion(job, report).promoted  # +0.10 >= 0.05
    assert not promotion(job, evaluation({"accuracy": 0.72}, {"accuracy": 0.70})).promoted
    assert promotion(job, evaluation({"accuracy": 0.72}, {"accuracy": 0.70})).reason == "BelowPromotionThreshold"
    assert promotion(job, evaluation({}, {"accuracy": 0.7})).reason == "MetricMissing"
    lower_is_better = job.spec.serving.promotion.model_copy(update={"metric": "mse", "min_improvement": 0.5})
    mse_job = job.model_copy(update={"spec": job.spec.model_copy(update={
        "serving": job.spec.serving.model_copy(update={"promotion": lower_is_better})})})
    assert promotion(mse_job, report).promoted  # mse 3.0 → 2.0 is an improvement of 1.0
    not_served = job.model_copy(update={"spec": job.spec.model_copy(update={
        "serving": job.spec.serving.model_copy(update={"enabled": False})})})
    assert promotion(not_served, report).reason == "ServingDisabled"


def test_conditions_keep_their_transition_time_until_their_status_changes():
    first = merge_conditions([], [{"type": "Ready", "status": "False", "reason": "Pending", "message": ""}], "t1")
    same = merge_conditions(first, [{"type": "Ready", "status": "False", "reason": "Pending", "message": "x"}], "t2")
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True", "reason": "Loaded", "message": ""}], "t3")
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flipped[0])] == ["t1", "t1", "t3"]


def test_replica_url_loaded_check_backoff_and_phase():
    pod = {"status": {"podIP": "10.1.2.3"}, "spec": {"containers": [
        {"name": "istio-proxy", "ports": [{"containerPort": 15090}]},
        {"name": "kserve-container", "ports": [{"containerPort": 8080}]}]}}
    assert replica_url(pod, 9999) == "http://10.1.2.3:8080"
    # With the adapter agent beside the runtime, the operator calls the agent.
    pod["spec"]["containers"].append({"name": "adapter-agent", "ports": [{"containerPort": 8085}]})
    assert replica_url(pod, 9999) == "http://10.1.2.3:8085"
    assert replica_url({"status": {"podIP": "10.1.2.3"}, "spec": {"containers": [{"name": "c"}]}}, 8080) == \
        "http://10.1.2.3:8080"
    adapter = Adapter.model_validate(yaml.safe_load((REPO / "examples" / "adapter.yaml").read_text()))
    assert is_loaded(adapter, {"id": adapter.metadata.name, "root": adapter.spec.uri})
    assert not is_loaded(adapter, {"id": adapter.metadata.name, "root": "s3://tessera/adapters/old/v0"})
    assert not is_loaded(adapter, None)
    assert [backoff_seconds(n) for n in (1, 2, 3, 20)] == [1.0, 2.0, 4.0, 300.0]
    loaded = {"name": "a", "state": "Loaded", "message": ""}
    failed = {"name": "b", "state": "Failed", "message": "HTTP 400: adapter is for another base model"}
    assert adapter_phase([]) [0] == "Pending"
    assert adapter_phase([loaded, loaded])[0] == "Ready"
    assert adapter_phase([loaded, failed])[0] == "Loading"
    assert adapter_phase([failed]) == ("Failed", "HTTP 400: adapter is for another base model")


class FlakyReplicaApi:
    """A replica's adapter API that refuses the first `failures` loads (stands in for a busy server)."""

    def __init__(self, failures: int) -> None:
        self.failures, self.loads, self.loaded = failures, 0, {}

    def cards(self, replica):
        return self.loaded

    def load(self, replica, adapter):
        self.loads += 1
        if self.loads <= self.failures:
            raise AdapterApiError("HTTP 503: engine busy")
        self.loaded[adapter.metadata.name] = {"id": adapter.metadata.name, "root": adapter.spec.uri}


def test_failed_loads_are_retried_with_backoff_and_a_restarted_replica_is_loaded_again():
    adapter = Adapter.model_validate(yaml.safe_load((REPO / "examples" / "adapter.yaml").read_text()))
    replica = Replica("predictor-0", "uid-1", "http://10.0.0.1:8080")
    api, backoff = FlakyReplicaApi(failures=2), Backoff()
    first = sync_replica(api, replica, adapter, backoff, now=100.0)
    assert first["state"] == "Failed" and first["attempts"] == 1 and "engine busy" in first["message"]
    waiting = sync_replica(api, replica, adapter, backoff, now=100.5)  # inside the 1 s backoff: no call
    assert waiting["state"] == "Failed" and api.loads == 1
    assert sync_replica(api, replica, adapter, backoff, now=101.1)["attempts"] == 2  # 2nd refusal
    assert sync_replica(api, replica, adapter, backoff, now=102.0)["state"] == "Failed" and api.loads == 2
    loaded = sync_replica(api, replica, adapter, backoff, now=103.2)
    assert loaded == {"name": "predictor-0", "url": "http://10.0.0.1:8080", "state": "Loaded", "message": "",
                      "attempts": 0}
    assert sync_replica(api, replica, adapter, backoff, now=104.0)["state"] == "Loaded" and api.loads == 3
    api.loaded.clear()  # the replica restarted and came back empty
    assert sync_replica(api, replica, adapter, backoff, now=105.0)["state"] == "Loaded" and api.loads == 4


def test_unloading_an_adapter_a_replica_does_not_hold_is_done_and_other_refusals_are_not():
    """The operator's adapter API client reads the replica's HTTP status, not its wording: 404 on
    unload means nothing to undo; any other refusal is reported. An in-process HTTP transport stands
    in for the replica (either runtime answers these statuses)."""
    import httpx

    def replica(status: int) -> AdapterApi:
        body = {"error": {"message": "The lora adapter 'x' cannot be found.", "code": status}}
        return AdapterApi(httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(status, json=body))))

    where = Replica("pod-0", "uid-0", "http://replica:8085")
    replica(404).unload(where, "x")
    with pytest.raises(AdapterApiError) as refused:
        replica(503).unload(where, "x")
    assert refused.value.status == 503 and "HTTP 503" in str(refused.value)


def test_only_the_steps_that_ask_a_teacher_get_its_key_from_the_jobs_secret():
    """The label and evaluate steps read TEACHER_API_KEY from the Secret the job names (optional: a
    teacher may need no key); prepare and publish never see it."""
    template = build_workflow_template()
    templates = {t["name"]: t for t in template["spec"]["templates"]}
    entry = templates[template["spec"]["entrypoint"]]
    chosen = {group[0]["name"]: group[0]["template"] for group in entry["steps"]}
    keyed = {name for name, t in templates.items() if any(e["name"] == "TEACHER_API_KEY"
                                                           for e in t.get("container", {}).get("env", []))}
    assert {step for step, name in chosen.items() if name in keyed} == {"label", "evaluate"}
    env = next(e for e in templates[chosen["label"]]["container"]["env"] if e["name"] == "TEACHER_API_KEY")
    assert env == {"name": "TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "{{workflow.parameters.teacher-secret}}", "key": "TEACHER_API_KEY", "optional": True}}}
    assert "value" not in env


def test_a_teacher_job_runs_the_label_step_with_its_secret():
    manifest = job_manifest()
    manifest["spec"]["dataset"]["teacher"] = {"url": "http://llama-70b.models.svc/openai/v1", "model": "llama-70b",
                                              "credentialsSecret": "teacher-key"}
    parameters = workflow_parameters(build_workflow(effective_job(manifest, CONFIG), CONFIG))
    assert (parameters["teacher"], parameters["teacher-secret"]) == ("true", "teacher-key")
    plain = workflow_parameters(build_workflow(effective_job(job_manifest(), CONFIG), CONFIG))
    assert plain["teacher"] == "false"
