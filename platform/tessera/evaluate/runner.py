"""`tessera evaluate`: the base model and the adapter on held-out data, by batched greedy generation.

    report = evaluate_job(job)                                   # the job's eval split, its checkpoint(s)
    report = evaluate_job(job, adapter_uri=..., data_uri=...)    # any adapter on any dataset

Prompts are the exact token ids training used before each answer (`tessera.data.encode_prompt`),
left-padded and sorted by length so a batch wastes little; answers go through the task's parser
and metrics. The teacher-forced loss on the answers (`eval_loss`) comes with every model.
With `spec.evaluation.selectCheckpointBy`, every checkpoint is scored and the best one becomes
"the adapter" of the job (publish reads that choice from the report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.api import FineTuneJob, paths
from tessera.api.adapter_dir import CONFIG_FILE
from tessera.api.records import EvaluationReport
from tessera.errors import TesseraError
from tessera.evaluate.report import best_checkpoint, improvement, label_counts, majority_baseline
from tessera.scratch import scratch_dir
from tessera.tasks import Example, Task, get_task

log = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"


class NothingToEvaluateError(TesseraError):
    """There is no adapter (no checkpoint) or no example to evaluate."""


@dataclass(frozen=True)
class Candidate:
    """An adapter to score: a name for the report, where it came from, and a local PEFT directory."""

    name: str
    uri: str
    checkpoint: str | None
    path: Path


def headline_metric(job: FineTuneJob, task: Task) -> str:
    evaluation = job.spec.evaluation
    return evaluation.select_checkpoint_by or (evaluation.metrics[0] if evaluation.metrics else task.default_metric)


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
    desc: str, show_progress: bool = True,
) -> list[str]:
    """Greedy answers to token-id prompts, batched with left padding, in the prompts' order."""
    import torch
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # Similar lengths side by side: less padding to compute through.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    model.eval()
    with tqdm(total=len(prompts), desc=desc, unit="ex", disable=not show_progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                     device=device)
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=pad,
                )
            for row, index in enumerate(chunk):
                answers[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
            bar.update(len(chunk))
    return answers


def answer_loss(model: Any, features: list[dict[str, list[int]]], collator: Any, batch_size: int) -> float | None:
    """Mean cross-entropy per answer token (prompt tokens are masked), over all `features`."""
    import torch

    device = next(model.parameters()).device
    total = tokens = 0.0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collator(features[start : start + batch_size]).items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            if count:
                total += float(model(**batch, use_cache=False).loss) * count
                tokens += count
    return total / tokens if tokens else None


def score_model(
    model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], job: FineTuneJob, *, desc: str,
    show_progress: bool = True, answers_out: list[str] | None = None,
) -> dict[str, Any]:
    """The task's metrics for one model, with `eval_loss`, samples/s and seconds per example
    (its generated answers into `answers_out`, if given)."""
    from tessera.data import Collator, build_features, encode_prompt
    from tessera.data.template import is_document

    evaluation = job.spec.evaluation
    features = build_features(examples, tokenizer, job.spec.training.max_seq_length, packing=False)
    scores: dict[str, Any] = {"eval_loss": answer_loss(model, features, Collator.for_tokenizer(tokenizer),
                                                       evaluation.batch_size)}
    if all(is_document(example) for example in examples):
        # Raw documents have no question to answer: their score is the loss alone.
        return scores
    prompts = [encode_prompt(example, tokenizer) for example in examples]
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=evaluation.max_new_tokens,
                               batch_size=evaluation.batch_size, desc=desc, show_progress=show_progress)
    seconds = time.perf_counter() - started
    if answers_out is not None:
        answers_out[:] = answers
    scores |= task.score(examples, answers)
    scores["samplesPerSecond"] = len(examples) / seconds if seconds > 0 else None
    scores["secondsPerExample"] = seconds / len(examples)
    return scores


def _load_examples(
    job: FineTuneJob, task: Task, data_uri: str | None,
) -> tuple[list[Example], dict[str, int], str, list[dict[str, Any]] | None]:
    """(examples, training label counts, description of the data, the prepared rows they come from or
    None for an ad-hoc dataset) — the job's eval split by default."""
    from tessera.data import load_prepared, read_dataset, record_examples, sample, validate_records

    evaluation = job.spec.evaluation
    seed = job.spec.training.seed
    if data_uri is None:
        prepared = load_prepared(job)
        rows = sample(prepared.eval, evaluation.max_samples, seed, lambda row: row.get("label"))
        train_labels = dict(prepared.manifest.get("labels", {}).get("train", {}))
        dataset = job.spec.dataset
        name = f"rows of {dataset.eval_uri}" if dataset.eval_uri else f"eval split of {dataset.uri}"
        return [Example.from_dict(row) for row in rows], train_labels, name, rows
    dataset = job.spec.dataset
    source = read_dataset(data_uri, dataset.format, dataset.columns)
    good, bad = validate_records(source.records, task, job)
    if bad:
        log.warning("%s: %d of %d rows cannot be scored and are left out (first: row %s, %s)", data_uri,
                    len(bad), len(source.records), bad[0].row, bad[0].reason)
    records = sample(good, evaluation.max_samples, seed, task.stratify_key)
    examples = [example for record in records for example in record_examples(task, record, dataset.label_map)]
    return examples, {}, data_uri, None


def _candidates(job: FineTuneJob, artifacts: Any, adapter_uri: str | None, workdir: Path) -> list[Candidate]:
    from tessera.store import fetch

    if adapter_uri is not None:
        path = fetch(adapter_uri, workdir / "adapter")
        if not (Path(path) / CONFIG_FILE).is_file():
            raise NothingToEvaluateError(f"{adapter_uri} is not a PEFT adapter directory (no {CONFIG_FILE})")
        return [Candidate("adapter", adapter_uri, None, Path(path))]
    steps = artifacts.checkpoint_steps()
    if not steps:
        raise NothingToEvaluateError(
            f"no checkpoint under {artifacts.uri(paths.checkpoints_prefix(job))}: run `tessera train` first"
        )
    chosen = steps if job.spec.evaluation.select_checkpoint_by else steps[-1:]
    candidates = []
    for step in chosen:
        key = f"{artifacts.checkpoint(step)}/{ADAPTER_SUBDIR}"
        local = artifacts.store.get_dir(artifacts.key(key), workdir / f"step-{step}")
        candidates.append(Candidate(f"step-{step}", artifacts.uri(key), artifacts.checkpoint(step), Path(local)))
    return candidates


def evaluate_job(
    job: FineTuneJob, *, adapter_uri: str | None = None, data_uri: str | None = None, show_progress: bool = True,
    serving: tuple[str, str] | None = None,
) -> EvaluationReport:
    """Score base and adapter; write the job's report unless an ad-hoc adapter or dataset was given.
    `serving`: (OpenAI base URL, model name) where the adapter is served, to time a teacher job's student there."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tessera.job_artifacts import JobArtifacts
    from tessera.train.distributed import DistEnv
    from tessera.train.modeling import detect_hardware, device_for, fetch_base_model, load_base_model
    from tessera.train.plan import compute_precision

    task = get_task(job.spec.dataset.task)
    metric = headline_metric(job, task)
    artifacts = JobArtifacts.open(job)
    examples, train_labels, data_name, rows = _load_examples(job, task, data_uri)
    if not examples:
        raise NothingToEvaluateError(f"no example to evaluate in {data_name}")
    hardware = detect_hardware(DistEnv())
    precision = compute_precision(job, hardware)
    device = device_for(hardware)

    with scratch_dir("evaluate") as scratch:
        workdir = Path(scratch)
        candidates = _candidates(job, artifacts, adapter_uri, workdir)
        model_dir = fetch_base_model(job)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = load_base_model(model_dir, job, precision, device)
        base = None
        if job.spec.evaluation.compare_with_base:
            base = score_model(model, tokenizer, task, examples, job, desc="evaluate base", show_progress=show_progress)
        scores: dict[str, dict[str, Any]] = {}
        answers: dict[str, list[str]] = {}
        for index, candidate in enumerate(candidates):
            if index == 0:
                model = PeftModel.from_pretrained(model, str(candidate.path), adapter_name=candidate.name)
            else:
                model.load_adapter(str(candidate.path), adapter_name=candidate.name)
            model.set_adapter(candidate.name)
            answers[candidate.name] = []
            scores[candidate.name] = score_model(model, tokenizer, task, examples, job,
                                                 desc=f"evaluate {candidate.name}", show_progress=show_progress,
                                                 answers_out=answers[candidate.name])

    chosen_name = best_checkpoint(metric, scores) if len(candidates) > 1 else candidates[0].name
    chosen = next(c for c in candidates if c.name == chosen_name)
    adapter = scores[chosen_name]
    golds = [example.label for example in examples]
    report = EvaluationReport(
        task=task.name,
        metric=metric,
        base=base,
        adapter=adapter,
        improvement=improvement(metric, base, adapter),
        majority=majority_baseline(train_labels, golds) if task.labels else None,
        samples=len(examples),
        labels=label_counts(golds) if task.labels else None,
        samples_per_second=adapter.get("samplesPerSecond"),
        seconds_per_example=adapter.get("secondsPerExample"),
        data=data_name,
        adapter_uri=chosen.uri,
        checkpoint=chosen.checkpoint,
        checkpoints={c.checkpoint: scores[c.name].get(metric) for c in candidates if c.checkpoint} or None,
    )
    if job.spec.dataset.teacher is not None and rows is not None and answers[chosen_name]:
        from tessera.evaluate.distillation import teacher_vs_student

        report.distillation = teacher_vs_student(job, task, rows, answers[chosen_name],
                                                 adapter.get("secondsPerExample"), serving)
    if adapter_uri is None and data_uri is None:
        artifacts.store.put_json(artifacts.key(paths.eval_report_key(job)), report.to_json())
    return report
