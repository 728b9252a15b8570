"""End to end on the simulated cluster: a FineTuneJob applied → the real pipeline steps →
an Adapter → hot-loaded into the InferenceService through the adapter agent of each predictor →
the `openai` SDK answers with it; with either launcher (a Training Operator v1 PyTorchJob or a
Kubeflow Trainer v2 TrainJob), and with the training pod killed after its first checkpoint: it
restarts, resumes from that checkpoint, and the job still succeeds with one adapter.

Stands in for a cluster: the Kubernetes API emulator and the Argo / Training Operator / Trainer v2
/ KServe controllers of tests/operator (which run the pods' real commands as local processes, and
for Trainer v2 a real HTTPS status server for the trainer's progress reports); for MinIO: moto's
S3 server on 127.0.0.1. The store credentials live only in a Secret: neither the operator nor the
pods inherit them from the test's environment.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid

import httpx
import openai
import pytest
from tessera.store import push

from tests.operator.controllers import STORE_SECRET
from tests.operator.harness import SAMPLE_CSV, OperatorProcess, finetunejob

pytestmark = pytest.mark.slow

FTJ = ("tessera.dev/v1alpha1", "FineTuneJob")
ADAPTER = ("tessera.dev/v1alpha1", "Adapter")
TRAINING = {"pytorchjob": ("kubeflow.org/v1", "PyTorchJob"), "trainjob": ("trainer.kubeflow.org/v1alpha1", "TrainJob")}
STEPS = 4


def served_models(url: str) -> dict[str, dict]:
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {card["id"]: card for card in cards}


def training_log(cluster, namespace: str) -> str:
    """Rank 0's log, every attempt of it (the pod's container log file)."""
    logs = list((cluster.root / "pods" / namespace).glob("ftj-fpb-train-*-0/*.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def kill_training_pod_after_its_first_checkpoint(cluster, launcher: str, namespace: str, operator) -> None:
    """SIGKILL rank 0 once it has reported step 1, which it does after saving checkpoint 1."""
    cluster.wait_for("the first checkpoint", lambda: "loss=" in training_log(cluster, namespace), 300, operator,
                     interval=0.02)
    controllers = cluster.controllers
    kill = controllers.training.kill_master if launcher == "pytorchjob" else controllers.trainer.kill_node
    cluster.emulator.run(lambda: kill(namespace, "ftj-fpb-train"))


@pytest.mark.parametrize("launcher", ["pytorchjob", "trainjob"])
def test_finetunejob_to_adapter_answering_through_the_inference_service(cluster, tiny_model, s3_env, tmp_path,
                                                                        launcher):
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    push(tiny_model, f"s3://{bucket}/models/tiny-llama")
    dataset = tmp_path / "tfns.csv"
    shutil.copy(SAMPLE_CSV, dataset)
    push(dataset, f"s3://{bucket}/datasets/tfns.csv")
    credentials = {key: os.environ[key] for key in ("S3_ENDPOINT", "S3_USE_HTTPS", "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    cluster.apply_workflow_template(namespace)
    # The job's Secret, and the chart's store Secret that predictor pods read (adapter agent, storage initializer).
    for secret in ("team-store", STORE_SECRET):
        cluster.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": secret, "namespace": namespace},
                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in credentials.items()}})
    # The installation runs PyTorchJobs by default and lets jobs choose TrainJobs (the chart's
    # training.launcher and training.otherLaunchers).
    operator = OperatorProcess(cluster, [namespace], tmp_path / "operator.log",
                               env={"TESSERA_OTHER_LAUNCHERS": "trainjob"}).start()
    try:
        job = finetunejob("fpb", namespace, f"s3://{bucket}/models/tiny-llama", f"s3://{bucket}",
                          dataset={"uri": f"s3://{bucket}/datasets/tfns.csv"},
                          store={"uri": f"s3://{bucket}", "credentialsSecret": "team-store"},
                          training={"maxSteps": STEPS},
                          distribution={"launcher": launcher, "maxRestarts": 1},
                          serving={"enabled": True, "createInferenceService": launcher == "pytorchjob",
                                   "promotion": {"metric": "accuracy", "minImprovement": -1.0}})
        cluster.create(job)
        kill_training_pod_after_its_first_checkpoint(cluster, launcher, namespace, operator)
        phases: list[str] = []

        def finished() -> bool:
            phase = (cluster.job(namespace, "fpb").get("status") or {}).get("phase")
            if phase and (not phases or phases[-1] != phase):
                phases.append(phase)
            return phase in ("Succeeded", "Failed")

        cluster.wait_for("the job to finish", finished, 420, operator, interval=0.5)
        status = cluster.job(namespace, "fpb")["status"]
        assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
        assert phases[-1] == "Succeeded" and "Training" in phases, phases
        assert status["progress"]["percent"] == 100.0 and status["progress"]["step"] == STEPS
        assert status["trainedTokens"] > 0 and status["checkpoints"]

        # The killed pod came back and resumed from its checkpoint; the kind says it restarted.
        training_job = cluster.get(*TRAINING[launcher], namespace, "ftj-fpb-train")
        assert training_job["metadata"]["ownerReferences"][0]["kind"] == "Workflow"
        log = training_log(cluster, namespace)
        resumed = [int(line.split("from checkpoint step ")[1].split()[0]) for line in log.splitlines()
                   if "resuming fpb from checkpoint step" in line]
        assert len(resumed) == 1 and 1 <= resumed[0] < STEPS, log
        if launcher == "pytorchjob":
            assert "Restarting" in {c["type"] for c in training_job["status"]["conditions"]}
            assert training_job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
        else:
            assert training_job["status"]["jobsStatus"][0]["succeeded"] == 1
            assert training_job["status"]["conditions"][0]["type"] == "Complete"
            # KEP-2779: the trainer reported its progress to Trainer v2; `kubectl get trainjob` shows it.
            trainer_status = training_job["status"]["trainerStatus"]
            assert trainer_status["progressPercentage"] == 100
            metrics = {m["name"]: m["value"] for m in trainer_status["metrics"]}
            assert metrics["currentStep"] == metrics["totalSteps"] == str(STEPS) and float(metrics["loss"]) > 0
            assert cluster.controllers.status_server.refused == []
        runtimes = cluster.list("trainer.kubeflow.org/v1alpha1", "TrainingRuntime", namespace)
        assert len(runtimes) == (1 if launcher == "trainjob" else 0)
        assert len(cluster.list(*ADAPTER, namespace)) == 1
        assert set(status["metrics"]["adapter"]) >= {"accuracy", "eval_loss"}
        assert "accuracy" in status["metrics"]["base"]
        assert status["adapterRef"]["name"] == "fpb"
        assert status["adapterRef"]["uri"].startswith(f"s3://{bucket}/adapters/{namespace}/fpb/")
        conditions = {c["type"]: c for c in status["conditions"]}
        assert all(conditions[t]["status"] == "True" for t in ("DataPrepared", "Trained", "Evaluated", "Published",
                                                               "Promoted", "Succeeded"))

        adapter = cluster.get(*ADAPTER, namespace, "fpb")
        assert adapter["metadata"]["labels"]["tessera.dev/job"] == "fpb"
        assert "ownerReferences" not in adapter["metadata"]
        assert adapter["spec"]["uri"] == status["adapterRef"]["uri"]
        if launcher == "pytorchjob":  # serving does not depend on the kind that trained the adapter
            cluster.wait_for("the adapter to be loaded", lambda: (cluster.get(*ADAPTER, namespace, "fpb")
                             .get("status") or {}).get("phase") == "Ready", 240, operator, interval=0.5)
            adapter = cluster.get(*ADAPTER, namespace, "fpb")
            replica = adapter["status"]["replicas"][0]
            assert replica["state"] == "Loaded"
            assert served_models(replica["url"])["fpb"]["root"] == adapter["spec"]["uri"]

            client = openai.OpenAI(base_url=adapter["status"]["url"], api_key="not-checked")
            assert "fpb" in {m.id for m in client.models.list()}
            answer = client.completions.create(model="fpb", prompt="Shares of the bank rose 5% after earnings.",
                                               max_tokens=4)
            assert answer.model == "fpb" and answer.choices[0].text

            # The operator went through the agent: the server loaded the agent's verified copy from the pod's volume.
            isvc = cluster.get("serving.kserve.io/v1beta1", "InferenceService", namespace, "tessera-tiny-llama")
            server_card = served_models(isvc["status"]["url"])["fpb"]
            assert "/volumes/adapters/fpb/" in server_card["root"]
            assert server_card["sha256"] == adapter["spec"]["sha256"]

            # A server that restarts comes back empty; the agent beside it loads the adapter into it again.
            server = cluster.controllers.kserve.replicas[f"{namespace}/tessera-tiny-llama"][0]
            old_pid = server.process.process.pid
            cluster.emulator.call(cluster.controllers.kserve.restart_replica(namespace, "tessera-tiny-llama"), 300)
            assert server.process.process.pid != old_pid
            cluster.wait_for("the adapter to be reloaded", lambda: "fpb" in served_models(replica["url"]), 60, operator)

            # Deleting the job does not unserve its adapter; deleting the Adapter unloads it first.
            cluster.emulator.call(cluster.server.delete(cluster.kind(*FTJ), namespace, "fpb"))
            cluster.wait_for("the job to be gone", lambda: cluster.job(namespace, "fpb") is None, 30, operator)
            assert cluster.get(*ADAPTER, namespace, "fpb") is not None
            assert "fpb" in served_models(replica["url"])
            cluster.emulator.call(cluster.server.delete(cluster.kind(*ADAPTER), namespace, "fpb"))
            cluster.wait_for("the Adapter to be unloaded and gone", lambda: cluster.get(*ADAPTER, namespace, "fpb")
                             is None, 60, operator)
            assert "fpb" not in served_models(replica["url"])
    finally:
        operator.stop()

    # No credential anywhere a person or a log collector can see.
    secret_values = [credentials["AWS_SECRET_ACCESS_KEY"], credentials["AWS_ACCESS_KEY_ID"]]
    visible = [operator.log_path.read_text(errors="replace"),
               json.dumps(cluster.list("v1", "Event", namespace)),
               json.dumps([o.get("status") for o in cluster.list(*FTJ, namespace) + cluster.list(*ADAPTER, namespace)])]
    for value in secret_values:
        assert not any(value in text for text in visible)
