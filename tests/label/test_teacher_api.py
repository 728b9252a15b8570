"""`spec.dataset.teacher`'s rules, as `tessera validate` and the operator apply them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from tessera.api import FineTuneJob


def job(task: str = "sentiment", **teacher) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
        "spec": {"baseModel": {"uri": "/models/base"},
                 "dataset": {"uri": "/data/x.csv", "task": task,
                             "teacher": {"url": "http://vllm.models.svc/openai/v1", "model": "llama-70b",
                                         **teacher}}},
    })


def test_defaults_and_camel_case_fields():
    teacher = job(maxConcurrency=16, minConfidence=0.6, price={"inputPerMillion": 0.6}).spec.dataset.teacher
    assert (teacher.max_concurrency, teacher.min_confidence, teacher.price.input_per_million) == (16, 0.6, 0.6)
    assert (teacher.samples, teacher.temperature, teacher.relabel, teacher.allow_partial) == (1, 0.0, False, False)


@pytest.mark.parametrize(
    ("task", "teacher", "message"),
    [
        ("sentiment", {"url": "vllm.models.svc/v1"}, "url"),
        ("sentiment", {"samples": 3}, "temperature"),
        ("sentiment", {"minConfidence": 1.5}, "minConfidence"),
        ("sentiment", {"maxConcurrency": 0}, "maxConcurrency"),
        ("ner", {}, "teacher: labels tasks sentiment, recommendation; not 'ner'"),
    ],
)
def test_bad_teacher_specs_are_refused_naming_the_field(task, teacher, message):
    with pytest.raises(ValidationError) as error:
        job(task, **teacher)
    assert message in str(error.value)


def test_a_url_with_credentials_is_refused_without_echoing_them():
    """What `tessera validate` and the operator print: the field and the rule, not the password."""
    from tessera.api import parse_resource
    from tessera.errors import InvalidSpecError

    manifest = job().to_manifest()
    manifest["spec"]["dataset"]["teacher"]["url"] = "http://admin:hunter2-secret@vllm.models.svc/v1"
    with pytest.raises(InvalidSpecError) as error:
        parse_resource(manifest)
    assert "spec.dataset.teacher.url" in str(error.value)
    assert "hunter2-secret" not in str(error.value)
