"""A FineTuneJob with `spec.dataset.teacher` on the simulated cluster: the label step's key comes from the
job's Secret, and a refused key fails the job with the reason, never the key.

Stands in for a cluster as test_operator_cluster.py does (kmock and the test-side Argo that runs each
step's real `tessera` command as a pod process, env from the pod spec only). Stands in for the teacher:
the aiohttp stand-in of tests/label/standin.py on 127.0.0.1, which answers 401 to any other key.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

from tests.label.standin import StandInTeacher
from tests.operator.harness import SAMPLE_CSV, SimulatedCluster, finetunejob

API_KEY = "sk-cluster-teacher-5f2b9c"  # noqa: S105 - the stand-in's key


def status_of(cluster: SimulatedCluster, namespace: str, name: str) -> dict:
    return (cluster.job(namespace, name) or {}).get("status") or {}


def secret(namespace: str, name: str, key: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name, "namespace": namespace},
            "data": {"TEACHER_API_KEY": base64.b64encode(key.encode()).decode()}}


def unlabelled(path: Path, rows: int = 12) -> Path:
    with SAMPLE_CSV.open(newline="") as stream:
        texts = [row["text"] for row in csv.DictReader(stream)][:rows]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        writer.writerows([text, ""] for text in texts)
    return path


def test_the_label_step_gets_the_key_from_the_secret_and_a_refused_key_fails_the_job(
    cluster, namespace, operator, tmp_path,
):
    data = unlabelled(tmp_path / "tweets.csv")
    wrong_key = "sk-wrong-" + API_KEY[::-1]
    cluster.create(secret(namespace, "teacher-good", API_KEY))
    cluster.create(secret(namespace, "teacher-bad", wrong_key))
    with StandInTeacher(API_KEY) as teacher:
        def job(name: str, secret_name: str) -> dict:
            # No base model: the prepare step after the label step fails fast, which is all this test needs.
            return finetunejob(name, namespace, str(tmp_path / "no-model"), str(tmp_path / "store"),
                               dataset={"uri": str(data), "maxRows": None,
                                        "teacher": {"url": teacher.url, "model": "sentiment",
                                                    "credentialsSecret": secret_name, "maxRetries": 1}})

        cluster.create(job("refused", "teacher-bad"))
        cluster.create(job("labelled", "teacher-good"))
        for name in ("refused", "labelled"):
            failed = lambda n=name: status_of(cluster, namespace, n).get("phase") == "Failed"  # noqa: E731
            cluster.wait_for(f"{name} to fail", failed, 180, operator)

    refused = status_of(cluster, namespace, "refused")
    assert refused["error"]["code"] == "LabelFailed"
    assert "refused the API key (HTTP 401)" in refused["error"]["message"]
    conditions = {c["type"]: c for c in refused["conditions"]}
    assert conditions["DataLabelled"]["status"] == "False"

    labelled = status_of(cluster, namespace, "labelled")
    assert labelled["error"]["code"] == "PrepareFailed", labelled["error"]
    assert {c["type"]: c["status"] for c in labelled["conditions"]}["DataLabelled"] == "True"
    assert len(teacher.answered) == 12 and set(teacher.answered.values()) == {1}
    manifest = json.loads((tmp_path / "store" / "jobs" / namespace / "labelled" / "labelled" / "manifest.json")
                          .read_text())
    assert manifest["counts"]["kept"] == 12

    seen = json.dumps([refused, labelled, cluster.events(namespace, "refused"), cluster.events(namespace, "labelled")])
    assert API_KEY not in seen and wrong_key not in seen
