"""The label step against a stand-in teacher (tests/label/standin.py: an aiohttp server on 127.0.0.1 that
stands in for a large model behind vLLM on a bad day) and against a real `tessera serve`.

Each test drives `label_job` (or `tessera label` in a process) on a small CSV whose label column is
empty in some rows, with the local store in a temporary directory, and checks what the server saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tessera.api import FineTuneJob
from tessera.api.paths import labelled_data_key, labelled_manifest_key, labelled_prefix, teacher_cache_prefix
from tessera.label import TeacherError, TeacherRefusedError, label_job

from tests.label.standin import StandInTeacher, sentiment_of

API_KEY = "sk-teacher-0123456789abcdef"  # noqa: S105 - the stand-in's key
TWEETS = [
    ("$ACME shares up 5% after earnings beat", ""),
    ("$NRDX guidance down, revenue miss", ""),
    ("$KONE holds its annual meeting on Tuesday", ""),
    ("$FORT up on new contract", "2"),  # a human label: kept as is (2 = neutral in TFNS)
    ("$SIEM down 3% premarket", ""),
    ("$BARC names a new chair", ""),
]


def write_dataset(path: Path, rows=TWEETS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_job(tmp_path: Path, url: str, model: str = "sentiment", **teacher) -> FineTuneJob:
    data = write_dataset(tmp_path / "tweets.csv")
    return FineTuneJob.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "distil", "namespace": "bank"},
        "spec": {
            "baseModel": {"uri": str(tmp_path / "base"), "quantization": {"bits": None}},
            "dataset": {"uri": str(data), "task": "sentiment",
                        "labelMap": {"0": "negative", "1": "positive", "2": "neutral"},
                        "teacher": {"url": url, "model": model, "credentialsSecret": "teacher-key",
                                    "maxConcurrency": 3, "maxRetries": 3,
                                    "price": {"inputPerMillion": 2.0, "outputPerMillion": 8.0}, **teacher}},
            "store": {"uri": str(tmp_path / "store")},
        },
    })


def store_path(job: FineTuneJob, key: str) -> Path:
    return Path(job.spec.store.uri) / key


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def teacher(monkeypatch):
    monkeypatch.setenv("TEACHER_API_KEY", API_KEY)
    with StandInTeacher(API_KEY, slow_seconds=3.0) as server:
        yield server


UNLABELLED = [text for text, label in TWEETS if not label]


def test_labels_the_empty_rows_keeps_human_ones_and_writes_the_manifest(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url)
    manifest = label_job(job, show_progress=False)

    rows = read_jsonl(store_path(job, labelled_data_key(job)))
    assert [r["text"] for r in rows] == [text for text, _ in TWEETS]
    assert [r["label"] for r in rows] == [label or sentiment_of(text) for text, label in TWEETS]
    assert rows[3]["label"] == "2", "a human label is never replaced without relabel"
    assert set(teacher.received) == {p for p in teacher.received if any(t in p for t in UNLABELLED)}
    assert len(teacher.received) == len(UNLABELLED) and set(teacher.answered.values()) == {1}
    counts = manifest["counts"]
    assert (counts["rows"], counts["human"], counts["asked"], counts["labelled"], counts["kept"]) == (6, 1, 5, 5, 6)
    assert manifest["teacherRows"] == [1, 2, 3, 5, 6]
    assert manifest["tokens"] == {"input": 40 * 5, "output": 2 * 5}
    assert manifest["cost"]["amount"] == pytest.approx((200 * 2.0 + 10 * 8.0) / 1e6)
    assert manifest["teacher"]["host"] == teacher.url.split("/")[2] and manifest["teacher"]["model"] == "sentiment"
    data = store_path(job, labelled_data_key(job)).read_bytes()
    assert manifest["dataSha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(store_path(job, labelled_manifest_key(job)).read_text()) == manifest


def test_a_rerun_reads_the_cache_and_sends_nothing(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url)
    label_job(job, show_progress=False)
    sent = sum(teacher.received.values())
    again = label_job(job, show_progress=False)
    assert sum(teacher.received.values()) == sent, "an answered row was asked again"
    assert again["counts"]["cached"] == again["counts"]["asked"] == 5
    assert again["requests"]["sent"] == 0


def test_relabel_asks_about_every_row(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url, relabel=True)
    manifest = label_job(job, show_progress=False)
    assert manifest["counts"]["asked"] == 6 and manifest["counts"]["human"] == 0
    rows = read_jsonl(store_path(job, labelled_data_key(job)))
    assert rows[3]["label"] == "positive"


def test_429_and_500_are_retried_a_bounded_number_of_times(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url, model="flaky-429")
    manifest = label_job(job, show_progress=False, backoff_base=0.01)
    assert set(teacher.received.values()) == {3} and set(teacher.answered.values()) == {1}
    # 200s: five answers and the check of the model list before them
    assert manifest["requests"]["retries"] == 10 and manifest["requests"]["statuses"] == {"200": 6, "429": 10}
    assert manifest["counts"]["kept"] == 6

    teacher.received.clear()
    job = make_job(tmp_path, teacher.url, model="always-500", maxRetries=2)
    with pytest.raises(TeacherError, match=r"5 of 5 rows could not be labelled .*HTTP 500.*after 3 attempts"):
        label_job(job, show_progress=False, backoff_base=0.01)
    assert set(teacher.received.values()) == {3}, "each row: one attempt and exactly maxRetries retries"
    assert not store_path(job, labelled_manifest_key(job)).exists(), "nothing to train on from a failed step"


def test_allow_partial_trains_on_what_was_labelled_and_counts_the_failures(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url, model="always-500", maxRetries=0, allowPartial=True)
    manifest = label_job(job, show_progress=False)
    assert manifest["counts"]["failed"] == 5 and manifest["counts"]["kept"] == 1
    rejected = json.loads(store_path(job, f"{labelled_prefix(job)}/rejected.json").read_text())
    assert [r["reason"] for r in rejected] == ["failed"] * 5 and [r["row"] for r in rejected] == [1, 2, 3, 5, 6]


def test_unparsed_answers_are_counted_not_guessed(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url, model="garbage")
    manifest = label_job(job, show_progress=False)
    assert manifest["counts"]["unparsed"] == 5 and manifest["counts"]["kept"] == 1
    rejected = json.loads(store_path(job, f"{labelled_prefix(job)}/rejected.json").read_text())
    assert {r["reason"] for r in rejected} == {"unparsed"}
    assert rejected[0]["answers"] == ["I would rather not say."]


def test_disagreeing_samples_give_low_confidence_rows_that_are_dropped(tmp_path, teacher):
    job = make_job(tmp_path, teacher.url, model="disagree", samples=3, temperature=0.7, minConfidence=0.5)
    manifest = label_job(job, show_progress=False)
    assert sum(teacher.answered.values()) == 15
    assert manifest["counts"]["droppedLowConfidence"] == 5 and manifest["counts"]["kept"] == 1
    rejected = json.loads(store_path(job, f"{labelled_prefix(job)}/rejected.json").read_text())
    assert [r["confidence"] for r in rejected] == [pytest.approx(1 / 3)] * 5


def test_samples_at_temperature_zero_are_refused_by_the_api(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        make_job(tmp_path, "http://127.0.0.1:1/v1", samples=3)


@pytest.mark.parametrize(
    ("model", "key", "reason"),
    [
        ("no-such-model", API_KEY, r"does not serve model 'no-such-model'.*it serves: always-500"),
        ("sentiment", "sk-wrong-key-000000", r"refused the API key \(HTTP 401\)"),
    ],
)
def test_a_wrong_model_or_key_fails_before_any_row_is_sent(tmp_path, teacher, monkeypatch, model, key, reason):
    monkeypatch.setenv("TEACHER_API_KEY", key)
    job = make_job(tmp_path, teacher.url, model=model)
    with pytest.raises(TeacherRefusedError, match=reason) as error:
        label_job(job, show_progress=False)
    assert not teacher.received, "no row may be sent to a teacher that cannot answer"
    assert key not in str(error.value)


def test_an_unreachable_or_slow_teacher_fails_with_the_reason(tmp_path, teacher, free_port):
    job = make_job(tmp_path, f"http://127.0.0.1:{free_port}/v1", maxRetries=2)
    started = time.monotonic()
    with pytest.raises(TeacherError, match=r"cannot connect \(ConnectError\), after 3 attempts"):
        label_job(job, show_progress=False, backoff_base=0.01)
    assert time.monotonic() - started < 30

    job = make_job(tmp_path, teacher.url, model="slow", timeoutSeconds=0.3, maxRetries=1)
    with pytest.raises(TeacherError, match=r"no answer within 0.3s, after 2 attempts"):
        label_job(job, show_progress=False, backoff_base=0.01)
    assert set(teacher.received.values()) == {2}


def test_the_key_appears_in_no_log_error_or_artifact(tmp_path, teacher, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests and headers at DEBUG
    errors = []
    for model in ("sentiment", "always-500", "no-such-model"):
        job = make_job(tmp_path / model, teacher.url, model=model, maxRetries=1)
        try:
            label_job(job, show_progress=False, backoff_base=0.01)
        except TeacherError as error:
            errors.append(str(error))
    monkeypatch.setenv("TEACHER_API_KEY", "sk-bad-key-" + API_KEY[::-1])
    try:
        label_job(make_job(tmp_path / "bad", teacher.url), show_progress=False)
    except TeacherError as error:
        errors.append(str(error))
    assert len(errors) == 3 and caplog.text
    for secret in (API_KEY, "sk-bad-key-" + API_KEY[::-1]):
        assert secret not in caplog.text and all(secret not in e for e in errors)
        for path in tmp_path.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_prepare_trains_on_the_labelled_rows(tmp_path, teacher):
    from tessera.data import prepare

    job = make_job(tmp_path, teacher.url)
    with pytest.raises(Exception, match="run `tessera label`"):
        prepare(job, check_lengths=False)
    label_job(job, show_progress=False)
    prepared = prepare(job, check_lengths=False)
    labels = sorted(row["label"] for row in prepared.train + prepared.eval)
    assert labels == sorted(["positive", "negative", "neutral", "neutral", "negative", "neutral"])


def test_a_killed_label_step_resumes_without_sending_an_answered_row_again(tmp_path, monkeypatch):
    """`tessera label` in its own process is SIGKILLed once the stand-in has answered 3 rows (and holds the
    rest); the rerun must ask only about the rows it never got an answer for."""
    rows = [(f"$T{i:02d} shares {'up' if i % 2 else 'down'} today", "") for i in range(12)]
    job = make_job(tmp_path, "http://placeholder/v1")
    write_dataset(Path(job.spec.dataset.uri), rows)
    monkeypatch.setenv("TEACHER_API_KEY", API_KEY)
    with StandInTeacher(API_KEY, hold_after=3) as server:
        job.spec.dataset.teacher.url = server.url
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job.to_manifest()))
        process = subprocess.Popen([sys.executable, "-m", "tessera", "label", "-f", str(job_file), "--no-progress"],
                                   env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert server.held.wait(timeout=120), "the step never reached the held state"
        cache = Path(job.spec.store.uri) / teacher_cache_prefix("bank")
        deadline = time.monotonic() + 60
        while len(list(cache.rglob("*.json"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for a state: the three answers written to the cache
        assert len(list(cache.rglob("*.json"))) == 3
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        server.release()
        manifest = label_job(job, show_progress=False)
    assert sum(server.answered.values()) == 12 and set(server.answered.values()) == {1}
    assert manifest["counts"]["cached"] == 3 and manifest["counts"]["kept"] == 12


def test_tessera_label_fails_with_the_reason_and_exit_code_never_the_key(tmp_path, teacher):
    """What a pod's log (and so the job's status and Events) gets from a failed label step."""
    job = make_job(tmp_path, teacher.url, model="always-500", maxRetries=1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.to_manifest()))
    env = {**os.environ, "TEACHER_API_KEY": API_KEY}
    failed = subprocess.run([sys.executable, "-m", "tessera", "label", "-f", str(job_file), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "5 of 5 rows could not be labelled" in failed.stderr and "HTTP 500" in failed.stderr
    assert API_KEY not in failed.stderr + failed.stdout

    job_file.write_text(yaml.safe_dump(make_job(tmp_path, teacher.url).to_manifest()))
    done = subprocess.run([sys.executable, "-m", "tessera", "label", "-f", str(job_file), "--json", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["counts"]["kept"] == 6
    assert "labelled 5 of 5 rows" in done.stderr and API_KEY not in done.stderr + done.stdout


def test_recommendations_get_the_label_and_the_conviction_the_teacher_gives(tmp_path, teacher):
    """The distillation study's task: buy/sell/hold with a conviction. An answer without a conviction
    cannot make a training example: it is counted as unparsed."""
    source = Path(__file__).resolve().parents[2] / "examples" / "data" / "recommendation.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()[:4]]
    data = tmp_path / "companies.jsonl"
    data.write_text("".join(json.dumps({"ticker": r["ticker"], "table": r["table"]}) + "\n" for r in records))
    job = make_job(tmp_path, teacher.url, model="recommender")
    job.spec.dataset.uri, job.spec.dataset.task, job.spec.dataset.label_map = str(data), "recommendation", {}
    manifest = label_job(job, show_progress=False)
    rows = read_jsonl(store_path(job, labelled_data_key(job)))
    expected = [r["ticker"] for r in records if r["ticker"] != "NRDX"]
    assert [r["ticker"] for r in rows] == expected
    assert all((r["label"], r["conviction"]) == ("buy", 0.8) for r in rows)
    assert manifest["counts"]["unparsed"] == len(records) - len(expected) == 1
    from tessera.data import prepare

    prepared = prepare(job, check_lengths=False)
    completions = [json.loads(row["completion"]) for row in prepared.train + prepared.eval]
    assert completions == [{"action": "buy", "conviction": 0.8}] * len(expected)


def test_a_teacher_that_fails_every_row_stops_the_step_after_a_few_rows(tmp_path, teacher):
    """Bounded time: with the teacher down, the step gives up after 2 x maxConcurrency rows in a row
    failed, instead of spending every row's retries."""
    rows = [(f"$Z{i:02d} trades flat", "") for i in range(40)]
    job = make_job(tmp_path, teacher.url, model="always-500", maxRetries=1, maxConcurrency=2)
    write_dataset(Path(job.spec.dataset.uri), rows)
    with pytest.raises(TeacherError, match=r"stopped after 4 rows in a row failed \(.*HTTP 500"):
        label_job(job, show_progress=False, backoff_base=0.01)
    assert 4 <= len(teacher.received) <= 5, "only the rows in flight when it stopped were asked"
