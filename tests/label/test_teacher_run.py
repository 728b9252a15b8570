"""The label step with a real `tessera serve` as the teacher, and a whole distillation job on one machine.

Real parts: the `tessera serve` process on 127.0.0.1 answering the OpenAI chat API with a PEFT adapter
hot-loaded through vLLM's adapter API, the embedded runner (label → prepare → train → evaluate →
publish), the local-directory store. Stand-ins: the tiny random LLaMA for a real base model (its
adapter, trained for seconds to answer "positive", for a large teacher model), and in the job test
the aiohttp stand-in teacher of tests/label/standin.py (a rule-based answer, so the teacher's
accuracy can be computed here independently).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import httpx
import pytest
from tessera.api import FineTuneJob
from tessera.api.paths import labelled_data_key
from tessera.label import TeacherRefusedError, label_job

from tests.label.standin import StandInTeacher, sentiment_of
from tests.label.test_labeller import API_KEY, make_job, read_jsonl, store_path
from tests.serve.helpers import serving, train_label_adapter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("base") / "tiny-llama")


def test_a_real_tessera_serve_adapter_labels_the_rows(tmp_path, tiny_base, monkeypatch):
    monkeypatch.delenv("TEACHER_API_KEY", raising=False)
    adapter = train_label_adapter(tiny_base, tmp_path / "adapters" / "positive", "positive")
    with serving(tiny_base, tmp_path, "--allowed-prefix", str(tmp_path / "adapters")) as url:
        httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bullish", "lora_path": str(adapter)},
                   timeout=120).raise_for_status()
        job = make_job(tmp_path, f"{url}/openai/v1", model="bullish", maxTokens=4)
        manifest = label_job(job, show_progress=False)
        with pytest.raises(TeacherRefusedError, match="does not serve model 'no-such-adapter'.*bullish"):
            label_job(make_job(tmp_path / "wrong", f"{url}/openai/v1", model="no-such-adapter"), show_progress=False)

    rows = read_jsonl(store_path(job, labelled_data_key(job)))
    assert [row["label"] for i, row in enumerate(rows) if i + 1 in manifest["teacherRows"]] == ["positive"] * 5
    assert manifest["counts"]["kept"] == 6 and manifest["counts"]["unparsed"] == 0
    assert manifest["tokens"]["input"] > 5 * 10 and 5 <= manifest["tokens"]["output"] <= 5 * 4


def _tfns(path: Path, rows: list[dict[str, str]], *, keep_labels: bool) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"] if keep_labels else ""} for r in rows)
    return path


def test_a_distillation_job_runs_end_to_end_with_lineage_and_the_teacher_vs_student_report(
    tmp_path, tiny_base, monkeypatch,
):
    from tessera.evaluate.runner import evaluate_job
    from tessera.local.runner import run_job
    from tessera.tasks import get_task

    with (ROOT / "examples" / "data" / "tfns-sample.csv").open(newline="") as stream:
        sample = list(csv.DictReader(stream))
    unlabelled = _tfns(tmp_path / "unlabelled.csv", sample[:40], keep_labels=False)
    heldout = _tfns(tmp_path / "heldout.csv", sample[40:56], keep_labels=True)
    monkeypatch.setenv("TEACHER_API_KEY", API_KEY)
    with StandInTeacher(API_KEY) as teacher:
        job = FineTuneJob.model_validate({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "distil"},
            "spec": {
                "baseModel": {"uri": str(tiny_base), "name": "tessera/tiny-llama", "quantization": {"bits": None}},
                "dataset": {"uri": str(unlabelled), "evalUri": str(heldout), "task": "sentiment",
                            "labelMap": TFNS_LABELS,
                            "teacher": {"url": teacher.url, "model": "sentiment",
                                        "price": {"inputPerMillion": 1.0, "outputPerMillion": 4.0}}},
                "training": {"epochs": 1, "batchSize": 8, "maxSeqLength": 256, "gradientCheckpointing": False},
                "distribution": {"workers": 1, "gpusPerWorker": 0},
                "evaluation": {"maxSamples": 16, "maxNewTokens": 3, "batchSize": 16},
                "cost": {"pricePerDeviceHour": 3.6},
                "store": {"uri": str(tmp_path / "store")},
            },
        })
        outcome = run_job(job, show_progress=False)
        # `tessera evaluate --serving-url`: a second stand-in (no keys) plays the server the student is loaded on.
        with StandInTeacher(None) as student_server:
            served = evaluate_job(job, show_progress=False, serving=(student_server.url, "sentiment"))

    task = get_task("sentiment")
    heldout_prompts = [task.to_example({"text": r["text"], "label": "neutral"}).prompt for r in sample[40:56]]
    assert set(heldout_prompts) <= set(teacher.received) and set(teacher.answered.values()) == {1}, \
        "every training and held-out tweet asked exactly once, the rerun of evaluate answered from the cache"
    assert dict(student_server.answered) == dict.fromkeys(heldout_prompts, 1), "timed on the server: each row once"
    served = served.distillation
    seconds = served["costPer1000"]["studentServingSecondsPerPrediction"]
    assert seconds > 0 and served["costPer1000"]["studentByServing"] == pytest.approx(1000 * seconds * 3.6 / 3600)
    section = outcome.evaluation.distillation
    golds = [TFNS_LABELS[r["label"]] for r in sample[40:56]]
    expected = sum(sentiment_of(p) == g for p, g in zip(heldout_prompts, golds, strict=True)) / len(golds)
    assert section["samples"] == 16 and section["gold"] == "human"
    assert section["teacherAccuracy"] == pytest.approx(expected)
    assert section["studentAccuracy"] == pytest.approx(outcome.evaluation.adapter["accuracy"])
    assert 0.0 <= section["agreement"] <= 1.0
    cost = section["costPer1000"]
    assert cost["teacherByTokens"] == pytest.approx(1000 * (40 * 1.0 + 2 * 4.0) / 1e6)
    student_seconds = outcome.evaluation.adapter["secondsPerExample"]
    assert cost["studentByTime"] == pytest.approx(1000 * student_seconds * 3.6 / 3600)

    card = json.loads((Path(outcome.adapter_uri.removeprefix("file://")) / "model-card.json").read_text())
    lineage = card["lineage"]["teacher"]
    data = (tmp_path / "store" / labelled_data_key(job)).read_bytes()
    assert lineage["labelledSha256"] == hashlib.sha256(data).hexdigest() == card["dataset"]["sha256"]
    assert lineage["host"] == teacher.url.split("/")[2] and lineage["model"] == "sentiment"
    assert len(lineage["promptSha256"]) == 64 and lineage["counts"]["kept"] == 40
    assert card["metrics"]["distillation"]["teacherAccuracy"] == section["teacherAccuracy"]
