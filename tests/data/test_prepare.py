"""`prepare` end to end: a job's dataset becomes prepared files, a manifest, and back again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from tessera.data import load_prepared, prepare
from tessera.errors import DatasetError

from tests.data.locations import EXAMPLES, SHARED_DATA

TFNS = {"uri": str(EXAMPLES / "tfns-sample.csv"), "task": "sentiment",
        "labelMap": {"0": "negative", "1": "positive", "2": "neutral"}}


def test_prepare_writes_split_examples_and_a_manifest(make_job, tokenizer, tmp_path):
    job = make_job(TFNS)
    prepared = prepare(job, tokenizer=tokenizer)
    prefix = tmp_path / "store" / "jobs" / "default" / "data-test" / "prepared"
    assert prepared.uri == prefix.as_uri()
    assert sorted(p.name for p in prefix.iterdir()) == ["bad_rows.json", "eval.jsonl", "manifest.json", "train.jsonl"]
    manifest = json.loads((prefix / "manifest.json").read_text())
    assert manifest == prepared.manifest
    assert manifest["source"]["rows"] == 400 and manifest["records"] == {"train": 320, "eval": 80}
    # Stratified: each label keeps its share (TFNS sample: 60 bearish, 81 bullish, 259 neutral).
    assert manifest["labels"]["eval"] == {"negative": 12, "neutral": 52, "positive": 16}
    assert manifest["tokens"]["train"]["max"] <= 256 and manifest["tokens"]["train"]["total"] > 320 * 40
    first = json.loads((prefix / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion", "label", "row", "line"}
    assert first["completion"] == first["label"] in {"negative", "neutral", "positive"}
    assert {r["row"] for r in prepared.train}.isdisjoint(r["row"] for r in prepared.eval)


def test_manifest_digests_are_stable_and_track_the_data(make_job, tokenizer, tmp_path):
    first = prepare(make_job(TFNS), tokenizer=tokenizer).manifest
    again = prepare(make_job(TFNS), tokenizer=tokenizer).manifest
    assert again == first
    assert first["datasetSha256"] == first["source"]["sha256"]
    other_seed = prepare(make_job(TFNS, ["spec.training.seed=7"]), tokenizer=tokenizer).manifest
    assert other_seed["datasetSha256"] == first["datasetSha256"]
    assert other_seed["files"]["train.jsonl"] != first["files"]["train.jsonl"]


def test_load_prepared_round_trips_and_refuses_tampered_files(make_job, tokenizer):
    job = make_job(TFNS, ["spec.dataset.maxRows=50", "spec.dataset.maxEvalRows=4"])
    prepared = prepare(job, tokenizer=tokenizer)
    assert len(prepared.train) == 40 and len(prepared.eval) == 4
    loaded = load_prepared(job)
    assert (loaded.train, loaded.eval, loaded.manifest) == (prepared.train, prepared.eval, prepared.manifest)
    assert loaded.train_examples()[0].prompt.startswith("Instruction: What is the sentiment")
    train_file = prepared.uri.removeprefix("file://") + "/train.jsonl"
    with open(train_file, "a") as handle:
        handle.write('{"prompt": "", "completion": "injected"}\n')
    with pytest.raises(DatasetError, match="train.jsonl does not match its manifest"):
        load_prepared(job)


def test_load_prepared_before_prepare_says_what_to_run(make_job):
    with pytest.raises(DatasetError, match="run `tessera prepare` for this job first"):
        load_prepared(make_job(TFNS))


def test_headline_questions_of_one_headline_stay_on_one_side(make_job, tmp_path):
    rows = ["News,Price Direction Up,Price Direction Down,Asset Comparision,Price Sentiment"]
    rows += [f"gold headline {i},{i % 2},{(i + 1) % 2},0,none" for i in range(30)]
    path = tmp_path / "headlines.csv"
    path.write_text("\n".join(rows) + "\n")
    job = make_job({"uri": str(path), "task": "headline", "columns": {"text": "News"}})
    prepared = prepare(job, check_lengths=False)
    assert prepared.manifest["records"] == {"train": 24, "eval": 6}
    assert prepared.manifest["examples"] == {"train": 72, "eval": 18}
    assert prepared.manifest["tokens"] is None
    train_lines = {r["line"] for r in prepared.train}
    assert train_lines.isdisjoint(r["line"] for r in prepared.eval)
    assert Counter(r["label"] for r in prepared.train + prepared.eval) == {"no": 60, "yes": 30}


def test_a_separate_eval_dataset_replaces_the_split(make_job, tokenizer, tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(9)))
    job = make_job({**TFNS, "evalUri": str(eval_path), "format": None}, ["spec.dataset.maxRows=30"])
    prepared = prepare(job, tokenizer=tokenizer)
    assert len(prepared.train) == 30 and len(prepared.eval) == 9
    assert prepared.manifest["evalSource"]["uri"] == str(eval_path)
    assert prepared.manifest["split"]["evalSplit"] is None


def test_missing_dataset_fails_before_anything_is_written(make_job, tokenizer, tmp_path):
    job = make_job({**TFNS, "uri": str(tmp_path / "absent.csv")})
    with pytest.raises(DatasetError, match=f"dataset {tmp_path / 'absent.csv'} does not exist"):
        prepare(job, tokenizer=tokenizer)
    assert not (tmp_path / "store" / "jobs").exists()


def test_prepare_reads_and_writes_s3(make_job, tokenizer, tiny_model_dir, s3_env, s3_bucket):
    """S3 is moto's server on 127.0.0.1 standing in for MinIO; the base model's tokenizer is read
    from the store without its weights."""
    from tessera.store import open_store, push

    dataset = push(EXAMPLES / "tfns-sample.csv", f"s3://{s3_bucket}/datasets/tfns.csv")
    model = push(tiny_model_dir, f"s3://{s3_bucket}/models/tiny")
    job = make_job({**TFNS, "uri": dataset}, [f"spec.store.uri=s3://{s3_bucket}/root",
                                              f"spec.baseModel.uri={model}", "spec.store.credentialsSecret=minio"])
    prepared = prepare(job)
    assert prepared.uri == f"s3://{s3_bucket}/root/jobs/default/data-test/prepared"
    store, _ = open_store(f"s3://{s3_bucket}")
    assert store.get_json("root/jobs/default/data-test/prepared/manifest.json") == prepared.manifest
    local = prepare(make_job(TFNS), tokenizer=tokenizer).manifest
    assert prepared.manifest["files"] == local["files"]
    assert prepared.manifest["tokens"]["train"] == local["tokens"]["train"]


@pytest.mark.skipif(not (SHARED_DATA / "headlines" / "gold_headlines.csv").exists(),
                    reason="the shared gold-news dataset is not here (it may not be copied into the repo)")
def test_the_real_gold_news_csv_prepares_with_its_own_columns(make_job):
    job = make_job({"uri": str(SHARED_DATA / "headlines" / "gold_headlines.csv"), "task": "headline",
                    "columns": {"text": "News"}, "maxRows": 200})
    prepared = prepare(job, check_lengths=False)
    assert prepared.manifest["source"]["badRows"] == 0
    assert prepared.manifest["examples"]["train"] == 160 * 6


def test_fixtures_are_what_the_generator_writes(tmp_path):
    tfns = SHARED_DATA / "tfns" / "train.csv"
    subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), "--out", str(tmp_path),
                    *(["--tfns", str(tfns)] if tfns.exists() else [])], check=True, capture_output=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert len(generated) == (10 if tfns.exists() else 7)  # TFNS: the sample, and the distillation pair
    for name in generated:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


@pytest.mark.parametrize(
    ("fixture", "task", "examples"),
    [("ner.jsonl", "ner", 180), ("xbrl-tags.csv", "xbrl-tags", 160), ("xbrl-values.jsonl", "xbrl-values", 160),
     ("recommendation.jsonl", "recommendation", 200), ("forecast.jsonl", "forecast", 200),
     ("chat.jsonl", "chat", 80), ("text.jsonl", "text", 60)],
)
def test_every_synthetic_fixture_prepares_without_a_bad_row(make_job, tokenizer, fixture, task, examples):
    prepared = prepare(make_job({"uri": str(EXAMPLES / fixture), "task": task}), tokenizer=tokenizer)
    assert prepared.manifest["source"]["badRows"] == 0
    assert len(prepared.train) + len(prepared.eval) == examples


def test_an_unreadable_base_model_tokenizer_is_named(make_job, tmp_path):
    from tessera.data import TokenizerError

    job = make_job(TFNS, [f"spec.baseModel.uri={tmp_path / 'no-model'}"])
    with pytest.raises(TokenizerError, match=r"base model .*no-model \(spec.baseModel.uri\) does not exist"):
        prepare(job)
