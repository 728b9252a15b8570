"""End to end on the simulated cluster: a FineTuneJob applied → the real pipeline steps →
an Adapter → hot-loaded into the InferenceService through the adapter agent of each predictor →
the `openai` SDK answers with it.

Stands in for a cluster: the Kubernetes API emulator and the Argo / Training Operator / KServe
controllers of tests/operator (which run the pods' real commands as local processes); for MinIO:
moto's S3 server on 127.0.0.1. The store credentials live only in a Secret: neither the operator
nor the pods inherit them from the test's environment.
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


def served_models(url: str) -> dict[str, dict]:
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {card["id"]: card for card in cards}


def test_finetunejob_to_adapter_answering_through_the_inference_service(cluster, tiny_model, s3_env, tmp_path):
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
    operator = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    try:
        job = finetunejob("fpb", namespace, f"s3://{bucket}/models/tiny-llama", f"s3://{bucket}",
                          dataset={"uri": f"s3://{bucket}/datasets/tfns.csv"},
                          store={"uri": f"s3://{bucket}", "credentialsSecret": "team-store"},
                          serving={"enabled": True, "promotion": {"metric": "accuracy", "minImprovement": -1.0}})
        cluster.create(job)
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
        assert status["progress"]["percent"] == 100.0 and status["progress"]["step"] == 2
        assert status["trainedTokens"] > 0 and status["checkpoints"]
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
        assert "/volumes/adapters/fpb/" in server_card["root"] and server_card["sha256"] == adapter["spec"]["sha256"]

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
